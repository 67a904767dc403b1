"""Call recordings (gateway/output/recording.py, docs/recordings.md): the WAV, its channels and timeline,
PCI muting, failures that leave transcription alone, retention, the store and the dashboard route.

Real parts throughout: the writer thread writes real files; the session tests run real Silero VAD and
turn detection on a fixture recording with a scripted transcriber (the words are not what is checked);
a full disk is a real one (a 64 KiB tmpfs when this process may mount one, else the kernel's
/dev/full, which fails every write with ENOSPC).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gateway.app import turn_config
from gateway.asr.interface import TranscriptionRequest, TranscriptionResult
from gateway.asr.stub import StubTranscriber
from gateway.config import ConfigError, Settings
from gateway.events import CALL_ENDED, Event, Source
from gateway.media.vad import BatchedVadRunner, SileroVad
from gateway.output.recording import (
    DISK_FULL_ERROR,
    MUTE_MARGIN_MS,
    PARTIAL_DIR,
    QUEUE_FULL,
    RecordingResult,
    RecordingWriter,
    file_name,
    relative_path,
    resolve,
)
from gateway.persister import parse_entry, store_events
from gateway.session import LegSpec, SessionHost
from gateway.store import migrate
from gateway.store.db import make_engine, make_sessionmaker
from gateway.store.models import Call
from gateway.store.users import create_user
from gateway.web import Dashboard
from tests.fixtures_data import read_pcm16
from tests.pg_server import recorded_call

FIXTURE = "caller_03_greetings.wav"
OTHER = "caller_05_mixed.wav"
PASSWORD = "correct horse battery"


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(frames x channels int16, rate)."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return data.reshape(-1, w.getnchannels()), w.getframerate()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.sqrt((a @ a) * (b @ b)) or 1.0))


def best_lag(channel: np.ndarray, reference: np.ndarray, max_lag: int) -> tuple[int, float]:
    """The offset (samples) at which ``reference`` sits in ``channel`` best, and its correlation."""
    scores = [(lag, correlation(channel[lag:lag + reference.size], reference)) for lag in range(0, max_lag)]
    return max(scores, key=lambda s: s[1])


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0


@pytest.fixture
def writer(tmp_path):
    failures: list[str] = []
    w = RecordingWriter(tmp_path / "rec", retention_days=30, on_failure=failures.append)
    w.failures_seen = failures  # type: ignore[attr-defined]
    w.start()
    yield w
    w.close()


def pcm_of(name: str) -> np.ndarray:
    pcm, rate = read_pcm16(name)
    assert rate == 8000
    return np.frombuffer(pcm, dtype="<i2")


# -- the writer on its own


async def test_two_legs_become_two_channels_each_at_its_offset_on_the_timeline(writer):
    caller, agent = pcm_of(FIXTURE)[:8000 * 6], pcm_of(OTHER)[:8000 * 6]
    rec = writer.open("call-two-legs", time.time())
    rec.add_leg("caller")
    rec.add_leg("agent")
    for i in range(0, caller.size, 160):  # 20 ms packets, as RTP brings them; the agent's leg starts 1.25 s later
        rec.feed("caller", caller[i:i + 160].tobytes(), origin_ms=0.0)
        rec.feed("agent", agent[i:i + 160].tobytes(), origin_ms=1250.0)
    result = await rec.finish()
    assert result.error is None
    frames, rate = read_wav(writer.directory / result.path)
    assert rate == 8000 and frames.shape[1] == 2
    assert frames.shape[0] == 10000 + agent.size
    assert result.duration_ms == round(frames.shape[0] / 8)
    assert result.bytes == (writer.directory / result.path).stat().st_size == 44 + frames.size * 2
    lag, score = best_lag(frames[:, 0], caller[:16000], 200)
    assert (lag, round(score, 3)) == (0, 1.0)
    lag, score = best_lag(frames[:, 1], agent[:16000], 12000)
    assert lag == 10000 and score > 0.99  # 1250 ms at 8 kHz
    assert not frames[:10000, 1].any()  # before its first packet the agent's channel is silence
    assert not frames[caller.size:, 0].any()
    # the other leg is not in the channel: the fixtures differ
    assert abs(correlation(frames[10000:10000 + 16000, 0], agent[:16000])) < 0.3
    assert result.path == relative_path("call-two-legs", time.time())
    assert not list((writer.directory / PARTIAL_DIR).iterdir())  # leg files gone


async def test_one_leg_is_mono_and_a_wideband_session_is_16_khz(writer):
    caller = pcm_of(FIXTURE)[:8000 * 2]
    rec = writer.open("mono", time.time())
    rec.feed("caller", caller.tobytes(), origin_ms=0.0)
    result = await rec.finish()
    frames, rate = read_wav(writer.directory / result.path)
    assert (frames.shape, rate) == ((caller.size, 1), 8000)
    assert np.array_equal(frames[:, 0], caller)
    wide = np.repeat(caller, 2)
    rec = writer.open("wide", time.time(), rate=16000)
    rec.feed("mic", wide, origin_ms=500.0, rate=16000)
    result = await rec.finish()
    frames, rate = read_wav(writer.directory / result.path)
    assert rate == 16000 and frames.shape == (8000 + wide.size, 1)
    assert np.array_equal(frames[8000:, 0], wide)


async def test_muted_spans_are_zero_with_their_margins_and_nothing_else_changes(writer):
    caller = pcm_of(FIXTURE)
    rec = writer.open("muted", time.time())
    rec.add_leg("caller")
    rec.add_leg("agent")
    rec.feed("caller", caller.tobytes(), origin_ms=0.0)
    rec.feed("agent", caller.tobytes(), origin_ms=0.0)
    rec.mute("caller", 2000, 3000)  # a redacted turn on one leg
    rec.mute(None, 5000, 5100)  # a masked DTMF digit: every leg
    rec.mute("nobody", 0, 10_000)  # a leg without a channel: nothing
    result = await rec.finish()
    frames, _ = read_wav(writer.directory / result.path)
    lo, hi = (2000 - MUTE_MARGIN_MS) * 8, (3000 + MUTE_MARGIN_MS) * 8
    assert rms(caller[lo:hi]) > 100  # there was speech to mute
    assert not frames[lo:hi, 0].any()
    assert np.array_equal(frames[:lo, 0], caller[:lo]) and np.array_equal(frames[hi:5000 * 8 - 1600, 0],
                                                                         caller[hi:5000 * 8 - 1600])
    assert np.array_equal(frames[lo:hi, 1], caller[lo:hi])  # the other leg kept its audio there
    d_lo, d_hi = (5000 - MUTE_MARGIN_MS) * 8, (5100 + MUTE_MARGIN_MS) * 8
    assert not frames[d_lo:d_hi].any()
    assert np.array_equal(frames[d_hi:, 0], caller[d_hi:])


async def test_finals_mute_their_turn_and_a_number_continued_from_the_previous_final(writer):
    audio = np.full(8000 * 10, 1000, np.int16)
    rec = writer.open("finals", time.time())
    rec.feed("caller", audio.tobytes(), origin_ms=0.0)
    rec.final("caller", 500, 1500, 0, "My number is four one one one")  # published before the rest was heard
    rec.final("caller", 3000, 4000, 1, "[REDACTED:card] thanks")  # the rest: redacted, and so is the start
    rec.final("caller", 6000, 7000, 0, "Anything else?")
    rec.final("caller", 8000, 8500, 1, "It is [REDACTED:cvv].")  # a redaction inside: the previous turn stays
    rec.final("caller", 9000, 9200, 0, "Please hold.")
    rec.final("caller", 9400, 9600, 1, "[REDACTED:card]")  # the previous final had no digits: it stays
    frames, _ = read_wav(writer.directory / (await rec.finish()).path)
    silent = frames[:, 0] == 0
    m = MUTE_MARGIN_MS * 8
    for a, b in ((500, 1500), (3000, 4000), (8000, 8500), (9400, 9600)):
        assert silent[a * 8 - m:b * 8 + m].all(), (a, b)
    assert not silent[1500 * 8 + m:3000 * 8 - m].any() and not silent[6000 * 8 - m:7000 * 8 + m].any()
    assert not silent[9000 * 8:9400 * 8 - m].any()


async def test_a_full_queue_fails_the_recording_once_and_says_so(tmp_path):
    failures: list[str] = []
    w = RecordingWriter(tmp_path / "rec", max_queued_bytes=4000, batch_bytes=320, on_failure=failures.append)
    w.partial_dir.mkdir(parents=True)  # not started: nothing drains the queue, as with a stuck disk
    rec = w.open("stuck", time.time())
    chunk = np.ones(160, np.int16).tobytes()
    for _ in range(100):
        rec.feed("caller", chunk, origin_ms=0.0)  # never blocks: 12 chunks fit, the 13th fails the recording
    assert rec.error == QUEUE_FULL and failures == [QUEUE_FULL] and w.failures == {QUEUE_FULL: 1}
    assert w.queued_bytes == 12 * 320
    w.start()
    result = await rec.finish()
    w.close()
    assert result == RecordingResult(None, error=QUEUE_FULL)
    assert result.fields() == {"recording_error": "queue-full"}
    assert not list(w.partial_dir.iterdir()) and not list(w.directory.glob("*/*/*/*.wav"))


async def test_enospc_from_the_kernel_fails_the_recording_as_disk_full(writer):
    """A leg file that is /dev/full: every write fails with the kernel's own ENOSPC."""
    rec = writer.open("devfull", time.time())
    (writer.partial_dir / f"{rec._stem}.0.pcm").symlink_to("/dev/full")
    rec.feed("caller", pcm_of(FIXTURE)[:1600].tobytes(), origin_ms=0.0)
    result = await rec.finish()
    assert result.error == DISK_FULL_ERROR and result.path is None
    assert writer.failures_seen == [DISK_FULL_ERROR]


# -- retention


def test_the_sweep_removes_expired_recordings_and_orphaned_partials_only(tmp_path):
    now = time.time()
    w = RecordingWriter(tmp_path / "rec", retention_days=7)
    old = w.directory / "2026/01/01/old.wav"
    recent = w.directory / "2026/01/20/recent.wav"
    other = w.directory / "2026/01/01/notes.txt"
    for path in (old, recent, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF")
    os.utime(old, (now - 8 * 86400, now - 8 * 86400))
    os.utime(recent, (now - 6 * 86400, now - 6 * 86400))
    os.utime(other, (now - 80 * 86400, now - 80 * 86400))
    w.partial_dir.mkdir(parents=True)
    orphan = w.partial_dir / "dead.0.pcm"
    orphan.write_bytes(b"\x01\x02")  # a gateway died mid-call: unmuted audio, nobody holds its lock
    live = w.partial_dir / "live.0.pcm"
    live.write_bytes(b"\x01\x02")
    import fcntl

    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a recording in progress (any process) holds its files
        assert w.sweep(now) == 2
    assert not old.exists() and not orphan.exists()
    assert recent.exists() and live.exists() and other.exists()
    assert (w.directory / "2026/01/01").is_dir()  # still holds notes.txt
    os.utime(recent, (now - 8 * 86400, now - 8 * 86400))
    assert w.sweep(now) == 2  # recent is expired now, and live's lock was released
    assert not (w.directory / "2026/01/20").exists()  # the empty day folder goes too
    assert RecordingWriter(tmp_path / "keep", retention_days=0).sweep(now) == 0


async def test_the_writer_thread_sweeps_at_start_and_every_interval(tmp_path):
    w = RecordingWriter(tmp_path / "rec", retention_days=1, sweep_interval_s=0.05)
    first = w.directory / "2026/01/01/a.wav"
    first.parent.mkdir(parents=True)
    first.write_bytes(b"x")
    os.utime(first, (1, 1))
    w.start()
    assert not first.exists()  # the start sweep
    later = w.directory / "2026/01/02/b.wav"
    later.parent.mkdir(parents=True)
    later.write_bytes(b"x")
    os.utime(later, (1, 1))
    for _ in range(400):
        if not later.exists():
            break
        await asyncio.sleep(0.01)
    w.close()
    assert not later.exists()


def test_paths_stay_inside_the_directory(tmp_path):
    assert file_name("6f0c1a2b-0000-4000-8000-000000000000") == "6f0c1a2b-0000-4000-8000-000000000000.wav"
    assert file_name("../../etc/passwd").endswith(".wav") and "/" not in file_name("../../etc/passwd")
    assert relative_path("abc", 0.0) == "1970/01/01/abc.wav"
    (tmp_path / "2026").mkdir()
    (tmp_path / "2026" / "x.wav").write_bytes(b"")
    assert resolve(tmp_path, "2026/x.wav") == (tmp_path / "2026" / "x.wav").resolve()
    for bad in ("../x.wav", "/etc/passwd", "", ".", "2026/../../x", "a\x00b"):
        assert resolve(tmp_path, bad) is None, bad
    (tmp_path / "2026" / "out.wav").symlink_to("/etc/hostname")
    assert resolve(tmp_path, "2026/out.wav") is None


def test_settings():
    s = Settings(recordings_dir="/var/lib/earshot/recordings", record=True, recording_retention_days=30)
    s.validate()
    with pytest.raises(ConfigError, match="recordings_dir"):
        Settings(record=True).validate()
    with pytest.raises(ConfigError, match="recording_retention_days"):
        Settings(recording_retention_days=-1).validate()


# -- sessions that record


class ScriptedTranscriber(StubTranscriber):
    """Answers each final with the next of ``texts`` (partials with placeholder words)."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__()
        self.texts = list(texts)

    def result(self, request: TranscriptionRequest) -> TranscriptionResult:
        base = super().result(request)
        if request.kind == "final" and self.texts:
            return dataclasses.replace(base, text=self.texts.pop(0))
        return base


@pytest.fixture
async def make_host():
    made = []

    def make(texts: list[str], directory: Path | None, **settings) -> SessionHost:
        s = Settings(**settings)
        runner = BatchedVadRunner(SileroVad())
        task = asyncio.create_task(runner.run())
        failures: list[str] = []
        writer = None
        if directory is not None:
            writer = RecordingWriter(directory, on_failure=failures.append)
            writer.start()
        published: list[Event] = []
        host = SessionHost(s, vad_runner=runner, transcriber=ScriptedTranscriber(texts), publish=published.append,
                           capacity=lambda: 4, turn_config=turn_config(s), recordings=writer)
        host.published = published  # type: ignore[attr-defined]
        host.failures = failures  # type: ignore[attr-defined]
        made.append((runner, task, writer))
        return host

    yield make
    for runner, task, writer in made:
        task.cancel()
        runner.close()
        if writer is not None:
            writer.close()


async def stream(session, leg: str, pcm: bytes, step: int = 320, during=None) -> None:
    for n, i in enumerate(range(0, len(pcm), step)):
        session.feed(leg, pcm[i:i + step], time.monotonic())
        if during is not None:
            during(n)
        await asyncio.sleep(0.004)  # 10x real time: the VAD keeps up (no backlog shed as silence)


def finals(events, leg=None):
    return [e for e in events if e.type == "turn.final" and (leg is None or e.leg == leg)]


TEXTS = ["Hello, thanks for calling.", "My card number is 4111 1111 1111 1111.", "Thank you, that is all.",
         "Goodbye now.", "Bye.", "Okay.", "Right."]


async def test_a_redacted_turn_is_silent_in_the_recording_and_the_others_are_not(make_host, tmp_path):
    host = make_host(TEXTS, tmp_path / "rec", redact_hold_ms=200)
    pcm, _ = read_pcm16(FIXTURE)
    session = host.open(Source("realtime", (("session_id", "s1"),)), [LegSpec("caller")], record=True)
    await stream(session, "caller", pcm)
    await session.end("client-closed")
    events = host.published
    ended = events[-1]
    assert ended.type == CALL_ENDED
    path = tmp_path / "rec" / ended.data["recording"]
    frames, rate = read_wav(path)
    assert rate == 8000 and frames.shape[1] == 1
    assert ended.data["recording_bytes"] == path.stat().st_size
    assert ended.data["recording_duration_ms"] == round(frames.shape[0] / 8) == round(len(pcm) / 16)
    turns = finals(events)
    redacted = [t for t in turns if t.data.get("redactions")]
    clean = [t for t in turns if not t.data.get("redactions")]
    assert len(redacted) == 1 and "[REDACTED:card]" in redacted[0].data["text"] and len(clean) >= 2
    audio = np.frombuffer(pcm, dtype="<i2")
    turn = redacted[0].data
    lo, hi = (turn["start_ms"] - MUTE_MARGIN_MS) * 8, (turn["end_ms"] + MUTE_MARGIN_MS) * 8
    assert rms(audio[turn["start_ms"] * 8:turn["end_ms"] * 8]) > 300  # speech was there
    assert not frames[max(0, lo):hi, 0].any()
    for t in clean:  # the rest of the speech is in the file as it was sent
        a, b = (t.data["start_ms"] + MUTE_MARGIN_MS) * 8, (t.data["end_ms"] - MUTE_MARGIN_MS) * 8
        if not (b <= lo or a >= hi):
            continue
        assert rms(frames[a:b, 0]) > 300 and np.array_equal(frames[a:b, 0], audio[a:b])


async def test_a_two_party_session_is_stereo_and_its_events_point_at_their_audio(make_host, tmp_path):
    """Each leg's channel holds that leg's audio from the leg's own origin (a SIPREC stream that
    starts later), and a final's start_ms..end_ms is where its speech is in the file."""
    host = make_host([], tmp_path / "rec")
    caller, _ = read_pcm16(FIXTURE)
    agent, _ = read_pcm16(OTHER)
    agent = agent[:len(caller)]
    session = host.open(Source("realtime", (("session_id", "s7"),)),
                        [LegSpec("caller"), LegSpec("agent", origin_ms=lambda: 700.0)], record=True)
    for i in range(0, len(caller), 320):
        session.feed("caller", caller[i:i + 320], time.monotonic())
        session.feed("agent", agent[i:i + 320], time.monotonic())
        await asyncio.sleep(0.004)
    await session.end("client-closed")
    frames, rate = read_wav(tmp_path / "rec" / host.published[-1].data["recording"])
    a, b = np.frombuffer(caller, dtype="<i2"), np.frombuffer(agent, dtype="<i2")
    assert rate == 8000 and frames.shape == (700 * 8 + b.size, 2)
    assert best_lag(frames[:, 0], a[8000:24000], 8000 + 200)[0] == 8000  # reference taken 1 s in
    lag, score = best_lag(frames[:, 1], b[8000:24000], 8000 + 700 * 8 + 200)
    assert lag == 8000 + 700 * 8 and score > 0.99
    assert not frames[:700 * 8, 1].any()
    for leg, channel, sent, origin in (("caller", 0, a, 0), ("agent", 1, b, 700 * 8)):
        turns = finals(host.published, leg)
        assert turns, leg
        for t in turns:
            lo, hi = t.data["start_ms"] * 8, t.data["end_ms"] * 8
            assert rms(frames[lo:hi, channel]) > 300
            assert np.array_equal(frames[lo:hi, channel], sent[lo - origin:hi - origin])


async def test_a_masked_dtmf_digit_mutes_its_tone_on_every_leg(make_host, tmp_path):
    host = make_host([], tmp_path / "rec")
    pcm, _ = read_pcm16(FIXTURE)
    session = host.open(Source("realtime", (("session_id", "s2"),)), [LegSpec("caller"), LegSpec("agent")],
                        record=True)
    session.card_context.mark(time.monotonic())  # "can I have your card number": keys now are card digits
    # a digit's offset is when it arrived (wall clock), the audio's is its samples: they agree when audio
    # comes in real time, so the first 1.5 s is fed fast and the key pressed once the clock caught up
    split = 1500 * 16
    for i in range(0, len(pcm), 320):  # both legs, one packet each in turn
        if i == split:
            while session.offset_ms(time.monotonic()) < 1500:
                await asyncio.sleep(0.01)
            session.dtmf("caller", "7", 160, time.monotonic())
        session.feed("caller", pcm[i:i + 320], time.monotonic())
        session.feed("agent", pcm[i:i + 320], time.monotonic())
        await asyncio.sleep(0.002)
    await session.end("client-closed")
    digit = next(e for e in host.published if e.type == "dtmf")
    assert digit.data["digit"] == "*" and digit.data["redactions"] == 1
    frames, _ = read_wav(tmp_path / "rec" / host.published[-1].data["recording"])
    at = digit.data["offset_ms"]
    lo, hi = (at - 160 - MUTE_MARGIN_MS) * 8, (at + MUTE_MARGIN_MS) * 8
    assert 0 < lo and hi < frames.shape[0]
    assert not frames[lo:hi].any()
    audio = np.frombuffer(pcm, dtype="<i2")
    assert np.array_equal(frames[hi:, 0], audio[hi:]) and np.array_equal(frames[:lo, 1], audio[:lo])


@contextlib.contextmanager
def tiny_filesystem(path: Path, size_kib: int):
    """A real filesystem of ``size_kib`` at ``path`` (tmpfs), or None where this process may not mount."""
    path.mkdir(parents=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(path)],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


async def test_a_full_disk_mid_call_is_reported_and_the_transcript_still_comes(make_host, tmp_path):
    pcm, _ = read_pcm16(FIXTURE)
    plain = make_host(list(TEXTS), None)
    session = plain.open(Source("realtime", (("session_id", "s3"),)), [LegSpec("caller")])
    await stream(session, "caller", pcm)
    await session.end("client-closed")
    expected = [e.data["text"] for e in finals(plain.published)]
    assert "recording" not in plain.published[-1].data and "recording_error" not in plain.published[-1].data

    with tiny_filesystem(tmp_path / "small", 64) as small:  # 64 KiB: the 10 s fixture (160 KB) fills it mid-call
        directory = small if small is not None else tmp_path / "devfull"
        host = make_host(list(TEXTS), directory)
        session = host.open(Source("realtime", (("session_id", "s4"),)), [LegSpec("caller")], record=True)
        if small is None:  # no mount allowed here: the leg file is /dev/full (ENOSPC at its first write)
            (host.recordings.partial_dir / f"{session.recording._stem}.0.pcm").symlink_to("/dev/full")
        await stream(session, "caller", pcm)
        await session.end("client-closed")
        ended = host.published[-1].data
        assert ended["recording_error"] == "disk-full" and "recording" not in ended
        assert host.failures == ["disk-full"]
        assert [e.data["text"] for e in finals(host.published)] == expected
        assert not list(host.recordings.partial_dir.iterdir())  # its partial files were removed
        if small is not None:  # it filled mid-call: some audio was taken before, none after
            assert 0 < session.recording.legs["caller"].samples < len(pcm) // 2


async def test_paused_transcription_is_silence_in_the_recording(make_host, tmp_path):
    host = make_host([], tmp_path / "rec")
    pcm, _ = read_pcm16(FIXTURE)
    session = host.open(Source("realtime", (("session_id", "s6"),)), [LegSpec("caller")], record=True)
    half = len(pcm) // 4 * 2
    await stream(session, "caller", pcm[:half])
    session.transcription_paused = True  # call control's pause (a payment is being taken)
    await stream(session, "caller", pcm[half:])
    await session.end("client-closed")
    frames, _ = read_wav(tmp_path / "rec" / host.published[-1].data["recording"])
    audio = np.frombuffer(pcm, dtype="<i2")
    assert frames.shape[0] == audio.size
    assert np.array_equal(frames[:half // 2, 0], audio[:half // 2]) and not frames[half // 2:].any()


async def test_a_session_asked_to_record_without_a_directory_says_so(make_host):
    host = make_host(["Hello there."], None)
    session = host.open(Source("realtime", (("session_id", "s5"),)), [LegSpec("caller")], record=True)
    await stream(session, "caller", read_pcm16(FIXTURE)[0][:32000])
    await session.end("client-closed")
    assert host.published[-1].data["recording_error"] == "no-directory"


# -- the store and the dashboard


def recorded_with(fields: dict, **kw) -> list[Event]:
    events = recorded_call(["Hello, I am calling about my order.", "Thank you."], **kw)
    last = events[-1]
    assert last.type == CALL_ENDED
    events[-1] = Event(CALL_ENDED, last.call, last.number, {**last.data, **fields}, created_at=last.created_at)
    return events


def test_the_persister_stores_what_call_ended_says_about_the_recording(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    good = recorded_with({"recording": "2026/01/10/a.wav", "recording_duration_ms": 61_250,
                          "recording_bytes": 980_044})
    bad = recorded_with({"recording_error": "disk-full"})
    with make_sessionmaker(engine)() as db:
        store_events(db, [parse_entry(f"{i}-0", e.to_fields()) for i, e in enumerate(good + bad, 1)])
        db.commit()
        a, b = db.get(Call, good[0].call.call_id), db.get(Call, bad[0].call.call_id)
        assert (a.recording, a.recording_duration_ms, a.recording_bytes, a.recording_error) == \
            ("2026/01/10/a.wav", 61_250, 980_044, None)
        assert (b.recording, b.recording_error) == (None, "disk-full")
    engine.dispose()


@pytest.fixture
def web(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    recordings = tmp_path / "recordings"
    wav = recordings / "2026/01/10/rec.wav"
    wav.parent.mkdir(parents=True)
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.arange(16000, dtype="<i2").tobytes())
    calls = {
        "recorded": recorded_with({"recording": "2026/01/10/rec.wav", "recording_duration_ms": 1000,
                                   "recording_bytes": wav.stat().st_size}),
        "escape": recorded_with({"recording": "../store.db", "recording_duration_ms": 1, "recording_bytes": 1}),
        "gone": recorded_with({"recording": "2026/01/09/gone.wav", "recording_duration_ms": 1, "recording_bytes": 1}),
        "failed": recorded_with({"recording_error": "disk-full"}),
    }
    with make_sessionmaker(engine)() as db:
        create_user(db, "alice", PASSWORD, "supervisor")
        db.commit()
        entries = [parse_entry(f"{i}-0", e.to_fields())
                   for i, e in enumerate([e for events in calls.values() for e in events], 1)]
        store_events(db, entries)
        db.commit()
    settings = Settings(database_url=url, stream_prefix="earshot-rec-unused", web_secret_file=str(tmp_path / "s"),
                        recordings_dir=str(recordings))
    d = Dashboard(settings, engine=engine)
    with TestClient(d.asgi) as client:
        yield client, {name: events[0].call.call_id for name, events in calls.items()}, wav
    engine.dispose()


def log_in(client) -> None:
    import re

    page = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    done = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf, "next": "/"},
                       follow_redirects=False)
    assert done.status_code == 303


def test_the_recording_route_streams_the_wav_with_ranges_and_only_when_logged_in(web):
    client, ids, wav = web
    url = f"/calls/{ids['recorded']}/recording"
    assert client.get(url).status_code == 401
    log_in(client)
    whole = client.get(url)
    assert whole.status_code == 200 and whole.headers["content-type"] == "audio/wav"
    assert whole.content == wav.read_bytes()
    assert whole.headers.get("accept-ranges") == "bytes"
    part = client.get(url, headers={"Range": "bytes=44-99"})
    assert part.status_code == 206
    assert part.content == wav.read_bytes()[44:100]
    assert part.headers["content-range"] == f"bytes 44-99/{wav.stat().st_size}"
    for name in ("escape", "gone", "failed"):
        assert client.get(f"/calls/{ids[name]}/recording").status_code == 404, name
    assert client.get("/calls/no-such-call/recording").status_code == 404
    page = client.get(f"/calls/{ids['recorded']}")
    assert f'<audio id="recording" controls preload="metadata" src="{url}">' in page.text
    failed = client.get(f"/calls/{ids['failed']}")
    assert "no recording: disk-full" in failed.text and "<audio" not in failed.text
