"""The ASR pool against the embedded backend, side by side in one run: accuracy, throughput,
end-of-speech -> turn.final latency, and a capacity curve.

Usage:
    .venv/bin/python bench/asr_pool.py [--modes embedded pool-1x1 pool-1x4 ...] [--latency-calls 4]
                                       [--latency-s 60] [--capacity-mode pool-2x4] [--capacity 1 2 4 8 16]
                                       [--capacity-s 60] [--wait-ms 20] [--limit N] [--no-write]

Modes: ``embedded`` is the gateway's in-process transcriber (WhisperTranscriber, the
defaults); ``embedded-text`` the same with text context only (``asr_context_audio_s`` 0:
what the OpenAI-compatible API can carry); ``openai`` is ``asr_backend: openai`` against
faster-whisper-server (tests/peers.py, a server nobody here wrote, serving the same
tiny.en); ``pool-WxB`` is the real pool: W ``earshot worker`` processes (subprocesses
here, on this machine) with ``asr_max_batch`` B (and ``asr_batch_wait_ms`` --wait-ms when
B > 1), reached through a private redis-server by PoolTranscriber, exactly as
``earshot run --asr pool`` does. Every mode uses the packaged tiny.en, int8, and splits
this machine's cores between its decoding threads (1 worker: 2 threads; 2 workers: 1
each; embedded: 2).

What drives them is the gateway's own leg pipeline without SIP/RTP (LegPipeline: Silero
VAD, turn detector, speculative finals, partials, context across turns), so requests
are what a call makes:

- A. accuracy and throughput: every speech fixture fed whole (no pacing), 8 files at a
  time, partials off (diagnostic D of bench/accuracy.py). Corpus WER of the finals
  against the fixtures' reference text; finals per second of wall time; ASR
  turnaround (request submitted -> result back) p50/p95.
- B. latency: ``--latency-calls`` simulated calls in real time for ``--latency-s``:
  each plays fixture callers at 20 ms pace into a pipeline on one BatchedVadRunner
  (partials on, as by default), with silence added so that speech is about 40 % of
  the call. End of speech -> turn.final as the gateway measures ``latency_ms`` (from
  the last voiced sample to the event being handed to the publisher; the Redis XADD of
  the event itself is not included).
- C. capacity: one mode driven by K simulated calls for each K: latency p50/p95,
  finals with an error (asr-timeout) and partials published, against K.

Everything (pipelines, VAD, workers) shares this machine's cores, so absolute numbers
are those of a 2-core box doing the gateway's and the workers' work at once; the
ratios between modes are measured side by side. Writes the "asr_pool" section of
bench/RESULTS.md and bench/results/asr_pool.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.diagnostic import finals_text, leg_pipeline, leg_pipeline_finals  # noqa: E402
from bench.common import (  # noqa: E402
    BENCH,
    code_version,
    load_snapshot,
    machine_description,
    now_utc,
    percentile,
    write_section,
)
from gateway.app import partials_enabled  # noqa: E402
from gateway.asr.interface import Transcriber, TranscriptionRequest, TranscriptionResult  # noqa: E402
from gateway.asr.wer import corpus_wer  # noqa: E402
from gateway.config import Settings, load_settings  # noqa: E402
from gateway.events import TURN_FINAL, TURN_PARTIAL, Event  # noqa: E402
from gateway.media.vad import BatchedVadRunner, SileroVad  # noqa: E402
from tests.e2e.harness import WorkerProcess, start_worker  # noqa: E402
from tests.fixtures_data import FixtureEntry, load_manifest, read_pcm16  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

SPEECH_KINDS = ("prompt", "caller", "monologue", "conversation")
TALK_RATIO = 0.4
FRAME_BYTES = 320  # 20 ms of 8 kHz 16-bit PCM
CORES = os.cpu_count() or 2


@dataclass(frozen=True)
class Mode:
    name: str
    workers: int  # 0: not the pool
    batch: int

    @classmethod
    def parse(cls, text: str) -> "Mode":
        if text in ("embedded", "embedded-text", "openai"):
            return cls(text, 0, 2)
        workers, batch = text.removeprefix("pool-").split("x")
        return cls(text, int(workers), int(batch))

    @property
    def threads(self) -> int:
        """CTranslate2 threads per decoding process: the cores split between the workers."""
        return max(1, CORES // max(1, self.workers))


class Timed:
    """Wraps a transcriber and records every request's turnaround."""

    def __init__(self, inner: Transcriber) -> None:
        self.inner = inner
        self.name = inner.name
        self.turnaround: dict[str, list[float]] = {"final": [], "partial": []}
        self.errors: dict[str, int] = {}

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        started = time.monotonic()
        try:
            result = await self.inner.transcribe(request)
        except Exception as exc:
            code = getattr(exc, "code", type(exc).__name__)
            self.errors[code] = self.errors.get(code, 0) + 1
            raise
        self.turnaround[request.kind].append(time.monotonic() - started)
        return result

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Backend:
    mode: Mode
    transcriber: Transcriber
    workers: list[WorkerProcess] = field(default_factory=list)
    peer: Any = None  # the OpenAI-compatible server of mode "openai"

    def worker_metrics(self) -> list[dict[str, float]]:
        return [w.metrics() for w in self.workers]


def settings_for(mode: Mode, redis_url: str, prefix: str, openai_url: str = "") -> Settings:
    environ = {"EARSHOT_REDIS_URL": redis_url, "EARSHOT_STREAM_PREFIX": prefix,
               "EARSHOT_ASR_THREADS": str(mode.threads), "EARSHOT_ASR_LOCAL_FILES_ONLY": "true",
               "EARSHOT_ASR_BACKEND": "pool" if mode.workers else ("openai" if mode.name == "openai" else "embedded")}
    if mode.name == "embedded-text":  # text context only: what the OpenAI-compatible API can carry
        environ["EARSHOT_ASR_CONTEXT_AUDIO_S"] = "0"
    if mode.name == "openai":
        environ.update({"EARSHOT_ASR_OPENAI_URL": openai_url or "http://127.0.0.1:9/v1", "EARSHOT_ASR_OPENAI_MODEL":
                        "whisper-1", "EARSHOT_ASR_OPENAI_PARTIALS": "true"})
    return load_settings(environ=environ)


async def open_backend(mode: Mode, redis_url: str, wait_ms: float) -> Backend:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    if mode.name == "openai":  # faster-whisper-server (tests/peers.py): a server nobody here wrote
        from tests import peers

        ok, reason = peers.available()
        if not ok:
            raise SystemExit(f"mode openai: {reason}")
        # the server decodes every request as the embedded backend decodes finals
        # (beam asr_beam_size, int8, the same threads), so the rows differ in what
        # the API carries, not in decoding options
        server = peers.OpenAIPeerServer(beam_size=load_settings(environ={}).asr_beam_size, cpu_threads=mode.threads)
        server.__enter__()
        settings = settings_for(mode, redis_url, prefix, server.base_url)
        from gateway.asr.factory import build_transcriber

        backend = Backend(mode, build_transcriber(settings))
        backend.peer = server
        return backend
    settings = settings_for(mode, redis_url, prefix)
    if mode.workers == 0:
        from gateway.asr.factory import build_transcriber

        transcriber = await asyncio.to_thread(build_transcriber, settings)
        return Backend(mode, transcriber)
    env = {"EARSHOT_REDIS_URL": redis_url, "EARSHOT_ASR_MAX_BATCH": str(mode.batch),
           "EARSHOT_ASR_BATCH_WAIT_MS": str(wait_ms if mode.batch > 1 else 0),
           "EARSHOT_ASR_THREADS": str(mode.threads), "EARSHOT_LOG_LEVEL": "warning"}
    workers = [await asyncio.to_thread(start_worker, prefix, env) for _ in range(mode.workers)]
    from gateway.asr.remote.pool import PoolTranscriber

    pool = PoolTranscriber(redis_url, names=settings.asr_pool_names, instance=f"bench-{uuid.uuid4().hex[:6]}",
                           default_timeout_s=settings.asr_final_timeout_s,
                           session_limit=settings.asr_pool_session_limit)
    await pool.start()
    return Backend(mode, pool, workers)


async def close_backend(backend: Backend) -> None:
    await backend.transcriber.close()
    for worker in backend.workers:
        await asyncio.to_thread(worker.stop)
    if backend.peer is not None:
        backend.peer.__exit__(None, None, None)


# -- A: accuracy and throughput -------------------------------------------------------------

async def accuracy_run(backend: Backend, entries: list[FixtureEntry], settings: Settings, vad: SileroVad,
                       concurrency: int = 8) -> dict[str, Any]:
    """Diagnostic D (bench/diagnostic.py) through this backend, 8 files at a time."""
    timed = Timed(backend.transcriber)
    started = time.monotonic()
    finals = await leg_pipeline_finals(timed, entries, settings, vad, concurrency)  # type: ignore[arg-type]
    wall = time.monotonic() - started
    texts = {file: finals_text(events) for file, events in finals.items()}
    errors = sum(1 for events in finals.values() for e in events if e.data.get("error"))
    wer = corpus_wer((e.text, texts[e.file]) for e in entries)
    done = timed.turnaround["final"]
    return {"wer": round(wer, 4), "finals": len(done), "errors": errors, "wall_s": round(wall, 1),
            "finals_per_s": round(len(done) / wall, 2),
            "turnaround_p50_ms": round(percentile(done, 50) * 1000), "turnaround_p95_ms": round(percentile(done, 95) * 1000),
            "texts": texts}


# -- B and C: simulated calls in real time --------------------------------------------------

def talk_padding(entry: FixtureEntry) -> float:
    """Seconds of silence after the file so that its speech is TALK_RATIO of the call."""
    speech = sum(t.end_ms - t.start_ms for t in entry.turns) / 1000
    return max(0.0, speech / TALK_RATIO - entry.duration_ms / 1000)


async def simulated_calls(backend: Backend, k: int, seconds: float, callers: list[FixtureEntry],
                          settings: Settings, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    vad = SileroVad()
    runner = BatchedVadRunner(vad)
    runner_task = asyncio.create_task(runner.run())
    latencies: list[float] = []
    errors: dict[str, int] = {}
    partials = 0
    calls = 0
    stop_at = time.monotonic() + seconds
    pcm_of = {e.file: read_pcm16(e.file)[0] for e in callers}

    def publish(event: Event) -> None:
        nonlocal partials
        if event.type == TURN_PARTIAL:
            partials += 1
        elif event.type == TURN_FINAL:
            if event.data.get("error"):
                errors[event.data["error"]] = errors.get(event.data["error"], 0) + 1
            elif event.speech_end_monotonic is not None:
                latencies.append(time.monotonic() - event.speech_end_monotonic)

    async def slot(i: int) -> None:
        nonlocal calls
        await asyncio.sleep(rng.uniform(0, min(5.0, seconds / 4)))  # calls do not start together
        while time.monotonic() < stop_at:
            entry = rng.choice(callers)
            audio = pcm_of[entry.file] + b"\x00\x00" * int(talk_padding(entry) * 8000)
            pipeline = leg_pipeline(backend.transcriber, settings, f"s{i}-{calls}-{uuid.uuid4().hex[:4]}", publish,
                                     partials=partials_enabled(settings))
            calls += 1
            runner.register(pipeline)
            next_frame = time.monotonic()
            for offset in range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES):
                next_frame += 0.020
                delay = next_frame - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                pipeline.feed_audio(audio[offset:offset + FRAME_BYTES], time.monotonic())
                if time.monotonic() > stop_at + 30:
                    break
            pipeline.finish_input(time.monotonic())
            await runner.drain()
            runner.unregister(pipeline)
            await pipeline.close()

    load_before = os.getloadavg()
    await asyncio.gather(*(slot(i) for i in range(k)))
    runner_task.cancel()
    try:
        await runner_task
    except asyncio.CancelledError:
        pass
    runner.close()
    return {"calls": k, "calls_placed": calls, "finals": len(latencies), "final_errors": errors,
            "partials": partials, "latency_p50_ms": round(percentile(latencies, 50) * 1000),
            "latency_p95_ms": round(percentile(latencies, 95) * 1000),
            "latency_max_ms": round(max(latencies) * 1000) if latencies else None,
            "load_before": [round(x, 2) for x in load_before]}


# -- the run --------------------------------------------------------------------------------

def modes_note(rows: list[dict[str, Any]]) -> str:
    """What the modes other than the pool and the plain embedded backend change."""
    names = {r["mode"] for r in rows}
    notes = []
    if "embedded-text" in names:
        notes.append("embedded-text: in process with `asr_context_audio_s` 0 (the earlier turns' text as the "
                     "prompt, no context audio: all an OpenAI-compatible request can carry)")
    if "openai" in names:
        notes.append(f"openai: `asr_backend: openai` against faster-whisper-server (tests/peers.py, from "
                     f".venv-peers) serving the same tiny.en, int8, beam {load_settings(environ={}).asr_beam_size} for "
                     f"every request, {Mode.parse('openai').threads} threads; each turn a 16 kHz WAV with the text "
                     "prompt")
    return ("\n" + ";\n".join(notes) + ".") if notes else ""


def table_a(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["mode"] == "embedded"), None)
    lines = ["| mode | workers x batch | WER | finals | finals/s | vs embedded | turnaround p50 / p95 | batch sizes seen |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        a = r["accuracy"]
        ratio = f"{a['finals_per_s'] / base['accuracy']['finals_per_s']:.2f}" if base else "-"
        lines.append(f"| {r['mode']} | {r['shape']} | {a['wer'] * 100:.2f} % | {a['finals']} | {a['finals_per_s']} | "
                     f"{ratio} | {a['turnaround_p50_ms']} / {a['turnaround_p95_ms']} ms | {r.get('batch_sizes', '-')} |")
    return "\n".join(lines)


def table_b(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | calls | finals | latency p50 | p95 | max | final errors | partials |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        b = r["latency"]
        if not b:
            continue
        lines.append(f"| {r['mode']} | {b['calls']} | {b['finals']} | {b['latency_p50_ms']} ms | {b['latency_p95_ms']} ms | "
                     f"{b['latency_max_ms']} ms | {b['final_errors'] or 'none'} | {b['partials']} |")
    return "\n".join(lines)


def table_c(curve: list[dict[str, Any]]) -> str:
    lines = ["| calls (K) | finals | latency p50 | p95 | max | final errors | partials |", "|---:|---:|---:|---:|---:|---|---:|"]
    for c in curve:
        lines.append(f"| {c['calls']} | {c['finals']} | {c['latency_p50_ms']} ms | {c['latency_p95_ms']} ms | "
                     f"{c['latency_max_ms']} ms | {c['final_errors'] or 'none'} | {c['partials']} |")
    return "\n".join(lines)


def batch_sizes(metrics: list[dict[str, float]]) -> str:
    """Mean batch size of finals over the workers' histograms."""
    count = sum(m.get('earshot_worker_batch_size_count{kind="final"}', 0) for m in metrics)
    total = sum(m.get('earshot_worker_batch_size_sum{kind="final"}', 0) for m in metrics)
    return f"mean {total / count:.2f} over {count:.0f} batches" if count else "-"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = [Mode.parse(m) for m in args.modes]
    entries = [e for e in load_manifest() if e.kind in SPEECH_KINDS]
    if args.limit:
        entries = entries[:args.limit]
    callers = [e for e in load_manifest() if e.kind == "caller"]
    server = RedisServer().start()
    vad = SileroVad()
    rows = []
    try:
        for mode in modes:
            backend = await open_backend(mode, server.url, args.wait_ms)
            settings = settings_for(mode, server.url, "unused", getattr(backend.peer, "base_url", ""))
            try:
                print(f"{mode.name}: accuracy and throughput over {len(entries)} files", flush=True)
                accuracy = await accuracy_run(backend, entries, settings, vad)
                sizes = batch_sizes(backend.worker_metrics()) if backend.workers else "-"
                print(f"  WER {accuracy['wer']:.4f}, {accuracy['finals_per_s']} finals/s; "
                      f"latency with {args.latency_calls} calls for {args.latency_s:.0f} s", flush=True)
                latency = await simulated_calls(backend, args.latency_calls, args.latency_s, callers, settings, seed=1) \
                    if args.latency_calls else None
                if latency:
                    print(f"  p50 {latency['latency_p50_ms']} ms, p95 {latency['latency_p95_ms']} ms", flush=True)
                curve = []
                if mode.name == args.capacity_mode:
                    for k in args.capacity:
                        point = await simulated_calls(backend, k, args.capacity_s, callers, settings, seed=k)
                        print(f"  capacity K={k}: p50 {point['latency_p50_ms']} ms, p95 {point['latency_p95_ms']} ms, "
                              f"errors {point['final_errors']}", flush=True)
                        curve.append(point)
            finally:
                await close_backend(backend)
            shape = (f"{mode.workers} x {mode.batch}" if mode.workers else
                     "faster-whisper-server over HTTP" if mode.name == "openai" else "in process")
            rows.append({"mode": mode.name, "shape": shape, "threads_per_process": mode.threads,
                         "accuracy": accuracy, "latency": latency, "batch_sizes": sizes, "capacity": curve})
    finally:
        server.stop()
    return {"rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["embedded", "pool-1x1", "pool-1x4", "pool-1x16", "pool-2x1",
                                                       "pool-2x4", "pool-2x16"])
    parser.add_argument("--wait-ms", type=float, default=20.0, help="asr_batch_wait_ms of workers with a batch > 1")
    parser.add_argument("--latency-calls", type=int, default=4)
    parser.add_argument("--latency-s", type=float, default=60.0)
    parser.add_argument("--capacity-mode", default="pool-2x4")
    parser.add_argument("--capacity", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16])
    parser.add_argument("--capacity-s", type=float, default=60.0)
    parser.add_argument("--limit", type=int, default=0, help="only the first N fixtures (smoke test)")
    parser.add_argument("--section", default="asr_pool", help="RESULTS.md section and bench/results/<section>.json")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    command = "  ".join([".venv/bin/python bench/asr_pool.py", *sys.argv[1:]])
    when, machine, code, load_before = now_utc(), machine_description(), code_version(), load_snapshot()
    started = time.monotonic()
    result = asyncio.run(run(args))
    load_after = load_snapshot()
    result.update({"command": command, "date": when, "machine": machine, "code": code, "load_before": load_before,
                   "load_after": load_after, "wall_s": round(time.monotonic() - started), "wait_ms": args.wait_ms,
                   "talk_ratio": TALK_RATIO})
    rows = result["rows"]
    curve_row = next((r for r in rows if r["capacity"]), None)
    title = "ASR pool vs embedded" if args.section == "asr_pool" else f"ASR backends ({args.section})"
    body = f"""## {title} (bench/asr_pool.py)

Command: `{command}`; {when}; {machine}; code {code}; {result['wall_s']} s in all.
Load before: {load_before}. After: {load_after}.

Packaged tiny.en, int8, everything on this one machine (pipelines, VAD, Redis, workers):
the cores are split between the decoding threads (1 worker: {Mode.parse('pool-1x1').threads} threads,
2 workers: 1 each, embedded: {Mode.parse('embedded').threads}); workers with a batch above 1 wait up to
{args.wait_ms:g} ms for it to fill (`asr_batch_wait_ms`); other settings are the defaults.{modes_note(rows)}

**A. Accuracy and throughput**: every speech fixture ({len(next(iter(rows))['accuracy']['texts'])} files)
through the leg pipeline without RTP, 8 files at a time, partials off, no deadline (the turns
of a file are found at once, not in real time); corpus WER of the finals
against the reference; finals per second of wall time; ASR turnaround = request submitted ->
result back at the gateway side.

{table_a(rows)}

"""
    if args.latency_calls:
        body += f"""
**B. End of speech -> turn.final** with {args.latency_calls} simulated calls in real time for
{args.latency_s:g} s (fixture callers paced at 20 ms into the leg pipeline, speech {TALK_RATIO:.0%} of the
call, partials on; `latency_ms` as the gateway measures it, without the event's own XADD):

{table_b(rows)}
"""
    if curve_row is not None:
        body += f"""
**C. Capacity curve** of {curve_row['mode']}: K simulated calls for {args.capacity_s:g} s each:

{table_c(curve_row['capacity'])}
"""
    body += """
Not run here: a GPU. No device machine was lent to this task, so large-v3-turbo on a GPU
(the production shape, where batching is the main lever) has no figures yet (docs/gpu.md).
Raw output: bench/results/{section}.json.
""".replace("{section}", args.section)
    out = BENCH / "results" / f"{args.section}.json"
    if not args.no_write:
        out.write_text(json.dumps(result, indent=1), encoding="utf-8")
        write_section(args.section, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
