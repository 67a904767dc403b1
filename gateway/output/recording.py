"""Call recordings: one WAV per session, a channel per leg, card details muted (docs/recordings.md).

Why it is built this way:

* The media path must never wait for a disk. A session's audio is handed to a
  :class:`RecordingWriter` (one per gateway) as it arrives, on the event loop,
  and only queued there; one writer thread does every write. The queue is
  bounded (``max_queued_bytes`` for all recordings together): when a slow or
  stuck disk lets it fill, the recording that could not queue is marked failed
  (``queue-full``) rather than the event loop blocking or memory growing, and
  transcription goes on. A write that fails (``ENOSPC`` / ``EDQUOT``:
  ``disk-full``; any other ``OSError``: ``write-error``) fails that recording
  the same way. Each failure is counted (``on_failure``), logged once per
  recording, and reported in ``call.ended`` (``recording_error``).
* Legs align on the session timeline. Each leg is written to its own raw
  16-bit file in the partial directory, at the sample its audio sits at in
  the session (the leg's ``origin_ms`` plus the samples fed before it, the
  same arithmetic as the events' ``start_ms``), so a leg that starts late or
  has no audio reads as silence (a hole in the file). At the end the legs are
  interleaved into the WAV: mono for one leg, one channel per leg in the
  order the session opened them otherwise.
* PCI: a final is redacted after its audio was written (and may be held for
  the next turn), so muting cannot happen on the way in. The session reports
  each redacted span of the timeline (:meth:`Recording.mute`); at the end,
  before the WAV exists, those sample ranges (plus ``MUTE_MARGIN_MS`` each
  side) are overwritten with zeros in place in the leg files, and only then is
  the WAV written and renamed into place. Unredacted card audio is therefore
  only ever in the partial files, which are deleted at the end of the call, on
  failure, and, if the process died, by the next sweep (a partial no process
  holds a lock on is an orphan).
* Retention: :meth:`RecordingWriter.sweep` (at start and every
  ``sweep_interval_s``, in the writer thread) removes recordings whose mtime
  is older than ``retention_days``, empty day folders, and orphaned partials.

Rates: a telephone leg carries 8 kHz audio (decoded G.711), a wideband leg 16 kHz;
a recording is 16 kHz when a leg it opens with is wideband, else 8 kHz (storing
8 kHz speech at 16 kHz would double the file and add nothing). A leg of the other
rate joining later is converted crudely (each sample twice / the mean of each pair).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import hashlib
import logging
import os
import queue
import re
import threading
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .redact import TAIL_S, _analyse

log = logging.getLogger(__name__)

MUTE_MARGIN_MS = 200  # muted on each side of a redacted span: word times and turn bounds are approximate
PARTIAL_DIR = ".partial"  # under the recordings directory: leg files of recordings in progress
BLOCK_FRAMES = 1 << 16  # frames read per leg and written per step when the WAV is assembled
DEFAULT_MAX_QUEUED_BYTES = 64 << 20  # audio waiting for the writer thread, all recordings together
DEFAULT_BATCH_BYTES = 16000  # a leg's audio is queued in pieces of about this much (1 s at 8 kHz), not per packet
SWEEP_INTERVAL_S = 3600.0
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# error codes in call.ended's recording_error
QUEUE_FULL = "queue-full"
DISK_FULL_ERROR = "disk-full"
WRITE_ERROR = "write-error"
NO_DIRECTORY = "no-directory"

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _classify(exc: OSError) -> str:
    return DISK_FULL_ERROR if exc.errno in DISK_FULL else WRITE_ERROR


def file_name(call_id: str) -> str:
    """The recording's file name: the call id when it is a safe name, else a hash of it."""
    if _SAFE_NAME.fullmatch(call_id) and ".." not in call_id:
        return f"{call_id}.wav"
    return hashlib.sha256(call_id.encode("utf-8", "replace")).hexdigest()[:32] + ".wav"


def relative_path(call_id: str, started_at: float) -> str:
    """``YYYY/MM/DD/<call>.wav`` (UTC day the call started): what call.ended and the store carry."""
    day = time.strftime("%Y/%m/%d", time.gmtime(started_at))
    return f"{day}/{file_name(call_id)}"


def resolve(directory: str | Path, relative: str) -> Path | None:
    """``relative`` under ``directory``, or None when it would leave it (``..``, absolute, a link out)."""
    if not relative or "\x00" in relative:
        return None
    root = Path(directory).resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, RuntimeError):
        return None
    if path == root or root not in path.parents:
        return None
    return path


@dataclass(frozen=True)
class RecordingResult:
    """What ``call.ended`` says about the recording."""

    path: str | None  # relative to the recordings directory; None: no file
    duration_ms: int = 0
    bytes: int = 0
    error: str | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.path is not None:
            out.update(recording=self.path, recording_duration_ms=self.duration_ms, recording_bytes=self.bytes)
        if self.error is not None:
            out["recording_error"] = self.error
        return out


@dataclass
class _Leg:
    name: str
    index: int
    start: int | None = None  # the leg's first sample on the recording's timeline (set at its first audio)
    samples: int = 0  # samples fed (at the recording's rate)
    pending: bytearray = field(default_factory=bytearray)  # fed, not yet queued (a batch in the making)
    pending_at: int = 0  # the timeline sample where ``pending`` starts
    carry: np.ndarray | None = None  # a 16 kHz leg into an 8 kHz recording: an odd sample left over


@dataclass
class _Files:
    """The writer thread's side of one recording: its leg files (locked while open)."""

    paths: dict[int, Path] = field(default_factory=dict)
    fds: dict[int, int] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)  # samples (timeline) written per leg


class Recording:
    """One session's recording, fed on the event loop; every file operation runs in the writer thread."""

    def __init__(self, writer: "RecordingWriter", call_id: str, started_at: float, rate: int) -> None:
        self.writer = writer
        self.call_id = call_id
        self.rate = rate
        self.relative = relative_path(call_id, started_at)
        self.legs: dict[str, _Leg] = {}
        self.mutes: list[tuple[int | None, int, int]] = []  # (leg index or None: all, first sample, end sample)
        # each leg's last final: its span (ms), and whether it was published ending in digits
        self._last_final: dict[str, tuple[float, float, bool]] = {}
        self.error: str | None = None
        self.finished = False
        self._files = _Files()
        self._stem = hashlib.sha256(f"{call_id}/{id(self)}/{time.time()}".encode()).hexdigest()[:20]

    # -- on the event loop
    def add_leg(self, leg: str) -> None:
        """Give ``leg`` its channel now (the session's legs, in order), even before it has audio."""
        if leg not in self.legs:
            self.legs[leg] = _Leg(leg, len(self.legs))

    def feed(self, leg: str, pcm: bytes | np.ndarray, origin_ms: float, rate: int = 8000) -> None:
        """The leg's next audio (16-bit samples at ``rate``); ``origin_ms``: where its sample 0 is."""
        if self.error is not None or self.finished:
            return
        self.add_leg(leg)
        state = self.legs[leg]
        samples = np.frombuffer(pcm, dtype="<i2") if isinstance(pcm, (bytes, bytearray, memoryview)) \
            else np.asarray(pcm, dtype=np.int16)
        samples = self._convert(state, samples, rate)
        if not samples.size:
            return
        if state.start is None:
            state.start = max(0, round(origin_ms * self.rate / 1000))
        if not state.pending:
            state.pending_at = state.start + state.samples
        state.samples += samples.size
        state.pending += samples.astype("<i2", copy=False).tobytes()
        if len(state.pending) >= self.writer.batch_bytes:
            self._queue(state)

    def _queue(self, state: _Leg) -> None:
        """Hand the leg's batch to the writer thread (never waits: a full queue fails the recording)."""
        data = bytes(state.pending)
        state.pending.clear()
        if data and not self.writer.submit(self, ("write", state.index, state.pending_at, data), len(data)):
            self.fail(QUEUE_FULL)

    def mute(self, leg: str | None, start_ms: float, end_ms: float, margin_ms: float = MUTE_MARGIN_MS) -> None:
        """Silence [start_ms - margin, end_ms + margin) of the session timeline on ``leg`` (None: every leg)."""
        lo = max(0, int((start_ms - margin_ms) * self.rate // 1000))
        hi = int(-(-(end_ms + margin_ms) * self.rate // 1000))
        if hi <= lo:
            return
        index = None if leg is None else (self.legs[leg].index if leg in self.legs else None)
        if leg is not None and index is None:
            return  # a leg that never had a channel has no audio to mute
        self.mutes.append((index, lo, hi))

    def final(self, leg: str, start_ms: float, end_ms: float, redactions: int, text: str) -> None:
        """A leg's published final: muted when redacted. A redacted final that starts with a redaction
        marker, after a final of the leg that was published ending in digits (within the redactor's
        ``TAIL_S``), continues a number whose start was published before the rest was heard, so not
        redacted there (docs/redaction.md, the published tail): that previous turn is muted too."""
        if redactions:
            self.mute(leg, start_ms, end_ms)
            previous = self._last_final.get(leg)
            if previous is not None and previous[2] and text.lstrip().startswith("[REDACTED:") \
                    and start_ms - previous[1] <= TAIL_S * 1000:
                self.mute(leg, previous[0], previous[1])
        # the redactor's own reading of where a text's trailing digits are (its published tail)
        self._last_final[leg] = (start_ms, end_ms, bool(_analyse(text, context=False).trailing))

    def fail(self, reason: str, detail: str = "") -> None:
        """Give the recording up (its partial files are removed); counted and logged once."""
        if self.writer.failed(self, reason, detail):
            self.writer.submit(self, ("abort",), 0, force=True)

    async def finish(self) -> RecordingResult:
        """Mute, assemble and rename the WAV (in the writer thread); what call.ended carries."""
        if self.finished:
            raise RuntimeError("recording already finished")
        self.finished = True
        if self.error is None and not self.writer.running:
            self.fail(WRITE_ERROR, "the recordings writer is not running")
        for state in self.legs.values():
            if self.error is None:
                self._queue(state)
        if self.error is not None:
            return RecordingResult(None, error=self.error)
        future: concurrent.futures.Future[RecordingResult] = concurrent.futures.Future()
        self.writer.submit(self, ("finish", future), 0, force=True)
        result = await asyncio.wrap_future(future)
        if result.error is not None and self.error is None:
            self.error = result.error
        return result

    def _convert(self, state: _Leg, samples: np.ndarray, rate: int) -> np.ndarray:
        if rate == self.rate:
            return samples
        if rate * 2 == self.rate:
            return np.repeat(samples, 2)
        if rate == self.rate * 2:
            if state.carry is not None and state.carry.size:
                samples = np.concatenate((state.carry, samples))
            even = samples.size - samples.size % 2
            state.carry = samples[even:].copy()
            pairs = samples[:even].astype(np.int32).reshape(-1, 2)
            return (pairs.sum(axis=1) // 2).astype(np.int16)
        raise ValueError(f"recording at {self.rate} Hz cannot take {rate} Hz audio")

    # -- in the writer thread
    def _write(self, index: int, offset: int, data: bytes) -> None:
        files = self._files
        fd = files.fds.get(index)
        if fd is None:
            path = self.writer.partial_dir / f"{self._stem}.{index}.pcm"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while the recording lives: not an orphan
            except OSError:
                os.close(fd)
                raise
            files.fds[index], files.paths[index] = fd, path
        view = memoryview(data)
        position = offset * 2
        while view:
            written = os.pwrite(fd, view, position)
            view, position = view[written:], position + written
        files.ends[index] = max(files.ends.get(index, 0), offset + len(data) // 2)

    def _discard(self) -> None:
        files = self._files
        for fd in files.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        for path in files.paths.values():
            try:
                path.unlink()
            except OSError:
                pass
        files.fds.clear()
        files.paths.clear()

    def _assemble(self) -> RecordingResult:
        files = self._files
        channels = max(1, len(self.legs))
        frames = max(files.ends.values(), default=0)
        for index, lo, hi in self.mutes:  # PCI: zeros over the redacted spans, in place, before the WAV exists
            for leg in ([index] if index is not None else list(files.fds)):
                fd = files.fds.get(leg)
                end = min(hi, files.ends.get(leg, 0))
                if fd is None or end <= lo:
                    continue
                zeros = bytes(2 * (end - lo))
                view, position = memoryview(zeros), 2 * lo
                while view:
                    written = os.pwrite(fd, view, position)
                    view, position = view[written:], position + written
        target = self.writer.directory / self.relative
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = self.writer.partial_dir / f"{self._stem}.wav"
        with open(temp, "wb") as raw:
            fcntl.flock(raw.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            with wave.open(raw, "wb") as out:
                out.setnchannels(channels)
                out.setsampwidth(2)
                out.setframerate(self.rate)
                for first in range(0, frames, BLOCK_FRAMES):
                    n = min(BLOCK_FRAMES, frames - first)
                    block = np.zeros((n, channels), dtype="<i2")
                    for index, fd in files.fds.items():
                        data = os.pread(fd, 2 * n, 2 * first)
                        if data:
                            column = np.frombuffer(data[: len(data) - len(data) % 2], dtype="<i2")
                            block[: column.size, index] = column
                    out.writeframes(block.tobytes())
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temp, target)
        self._discard()
        return RecordingResult(self.relative, duration_ms=round(frames * 1000 / self.rate),
                               bytes=target.stat().st_size)


class RecordingWriter:
    """The gateway's recordings: a directory, a bounded queue and the thread that drains it."""

    def __init__(self, directory: str | Path, *, retention_days: int = 0,
                 max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES, batch_bytes: int = DEFAULT_BATCH_BYTES,
                 on_failure: Callable[[str], None] | None = None,
                 sweep_interval_s: float = SWEEP_INTERVAL_S, clock: Callable[[], float] = time.time) -> None:
        """``retention_days``: recordings older than this are removed by the sweep; 0: kept for ever."""
        self.directory = Path(directory)
        self.partial_dir = self.directory / PARTIAL_DIR
        self.retention_days = retention_days
        self.max_queued_bytes = max_queued_bytes
        self.batch_bytes = batch_bytes
        self.on_failure = on_failure
        self.sweep_interval_s = sweep_interval_s
        self._clock = clock
        self._queue: queue.SimpleQueue[tuple[Recording | None, tuple[Any, ...], int]] = queue.SimpleQueue()
        self._queued = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.failures: dict[str, int] = {}
        self.swept = 0  # files the sweeps removed

    # -- life cycle
    def start(self) -> None:
        """Create the directories, sweep once, start the writer thread (which sweeps every interval)."""
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.sweep()
        self._thread = threading.Thread(target=self._run, name="earshot-recordings", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the thread after the work queued before (finishing recordings' WAVs get written)."""
        if self._thread is None:
            return
        self._queue.put((None, ("stop",), 0))
        self._thread.join(timeout)
        self._thread = None

    def open(self, call_id: str, started_at: float, *, rate: int = 8000) -> Recording:
        return Recording(self, call_id, started_at, rate)

    # -- from the event loop
    @property
    def queued_bytes(self) -> int:
        return self._queued

    def submit(self, recording: Recording, op: tuple[Any, ...], size: int, *, force: bool = False) -> bool:
        """Queue ``op``; False (nothing queued) when ``size`` more bytes would pass the bound."""
        with self._lock:
            if not force and self._queued + size > self.max_queued_bytes:
                return False
            self._queued += size
        self._queue.put((recording, op, size))
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def failed(self, recording: Recording, reason: str, detail: str = "") -> bool:
        """Mark ``recording`` failed (from either thread); False when it already was."""
        with self._lock:
            if recording.error is not None:
                return False
            recording.error = reason
            self.failures[reason] = self.failures.get(reason, 0) + 1
        log.error("recording of call %s failed (%s%s); the call goes on without it", recording.call_id, reason,
                  f": {detail}" if detail else "")
        if self.on_failure is not None:
            try:
                self.on_failure(reason)
            except Exception:
                log.exception("recording failure callback failed")
        return True

    # -- the thread
    def _run(self) -> None:
        next_sweep = time.monotonic() + self.sweep_interval_s
        while True:
            try:
                recording, op, size = self._queue.get(timeout=max(0.0, next_sweep - time.monotonic()))
            except queue.Empty:
                next_sweep = time.monotonic() + self.sweep_interval_s
                self._sweep_safely()
                continue
            with self._lock:
                self._queued -= size
            if op[0] == "stop":
                return
            assert recording is not None
            self._do(recording, op)

    def _do(self, recording: Recording, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "abort":
            recording._discard()
            return
        if kind == "write":
            if recording.error is not None:
                return
            try:
                recording._write(op[1], op[2], op[3])
            except OSError as exc:
                self._thread_failure(recording, exc)
            return
        if kind == "finish":
            future: concurrent.futures.Future[RecordingResult] = op[1]
            if recording.error is not None:
                recording._discard()
                future.set_result(RecordingResult(None, error=recording.error))
                return
            try:
                result = recording._assemble()
            except OSError as exc:
                self._thread_failure(recording, exc)
                try:
                    (self.partial_dir / f"{recording._stem}.wav").unlink()
                except OSError:
                    pass
                result = RecordingResult(None, error=recording.error)
            except Exception:
                log.exception("recording of call %s could not be assembled", recording.call_id)
                recording._discard()
                result = RecordingResult(None, error=WRITE_ERROR)
            future.set_result(result)

    def _thread_failure(self, recording: Recording, exc: OSError) -> None:
        self.failed(recording, _classify(exc), str(exc))
        recording._discard()

    # -- retention
    def _sweep_safely(self) -> None:
        try:
            self.sweep()
        except Exception:
            log.exception("recordings sweep failed")

    def sweep(self, now: float | None = None) -> int:
        """Remove recordings older than ``retention_days`` (by mtime), then empty folders, and
        partial files no process holds (a gateway that died mid-call); how many files went."""
        now = self._clock() if now is None else now
        removed = 0
        if self.partial_dir.is_dir():
            for path in self.partial_dir.iterdir():
                if path.is_file() and _orphan(path):
                    try:
                        path.unlink()
                        removed += 1
                    except OSError:
                        pass
        if self.retention_days > 0 and self.directory.is_dir():
            cutoff = now - self.retention_days * 86400
            for dirpath, dirnames, filenames in os.walk(self.directory, topdown=False):
                here = Path(dirpath)
                if here == self.partial_dir or self.partial_dir in here.parents:
                    continue
                for name in filenames:
                    if not name.endswith(".wav"):
                        continue
                    path = here / name
                    try:
                        if path.lstat().st_mtime < cutoff:
                            path.unlink()
                            removed += 1
                    except OSError:
                        pass
                if here != self.directory and here != self.partial_dir:
                    try:
                        here.rmdir()  # only when empty
                    except OSError:
                        pass
        if removed:
            log.info("recordings sweep removed %d file(s)", removed)
        self.swept += removed
        return removed


def _orphan(path: Path) -> bool:
    """A partial file whose lock nobody holds: its recording's process is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
