"""A local file that keeps events Redis has not taken yet, across restarts.

The publisher spools when its memory buffer is full, when Redis has been
unreachable for ``publish_spool_after_s`` and at shutdown, and replays the file
in order before anything newer (at start too). The file is append-only JSON
lines, one per record, so a crash can only tear the last line:

* an event record: ``{"s": seq, "o": origin, "e": {event wire form}, "t": speech end}``;
* a commit record: ``{"done": offset}``: every record ending at or before that
  byte offset reached Redis. Replay starts after the last commit record; a
  commit lost in a crash only means a few events are sent again, and Redis
  skips those (the publisher's ``(origin, seq)`` high-water mark).

Once every record is committed the file is truncated to zero. Writes go to
the page cache at once (a process crash loses nothing written); the
publisher fsyncs at most once a second while there is something new, and at
close, so a power loss can cost up to a second of spooled events.

A torn last line (no newline, or not JSON) is logged and cut off at open; a
bad line elsewhere (only bit rot makes one) is logged, counted and skipped.
One process holds the file at a time (``flock``): a second gateway given the
same path runs without a spool and says so.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import state_file

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


def spool_file_for(database_url: str, configured: str = "") -> Path:
    """Where the spool lives: the setting, else next to the SQLite file (as the web secret), else the
    working directory."""
    return state_file(database_url, configured, ".spool", "earshot-events.spool")


class SpoolError(OSError):
    """The spool file cannot be used (another process holds it, or it cannot be opened)."""


@dataclass(frozen=True)
class SpoolRecord:
    end: int  # byte offset just past this record's line: what commit() takes
    data: dict[str, Any]


class Spool:
    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes < 4096:
            raise ValueError(f"max_bytes must be at least 4096, got {max_bytes!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self.size = 0  # bytes in the file
        self.pending = 0  # event records not yet committed
        self._done = 0  # records ending at or before this offset reached Redis
        self.dirty = False  # written since the last sync()
        self.corrupt = 0  # unreadable records skipped (bit rot); a torn tail is not counted
        self.torn_bytes = 0  # bytes of a torn last record cut off at open

    # -- life cycle
    def open(self) -> None:
        """Create or take over the file: lock it, find what is still to replay, cut a torn tail.
        Blocking (reads the whole file): call it from a thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot open the spool file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"the spool file {self.path} is held by another process "
                             "(give each gateway its own publish_spool_file)") from None
        self._fd = fd
        try:
            self._scan()
        except BaseException:
            self.close()
            raise

    def _scan(self) -> None:
        assert self._fd is not None
        offset, done, good_end = 0, 0, 0
        ends: list[int] = []  # ends of event records (only those after the last commit count)
        tail = b""
        while True:
            chunk = os.pread(self._fd, READ_CHUNK, offset + len(tail))
            if not chunk:
                break
            data = tail + chunk
            start = 0
            while True:
                newline = data.find(b"\n", start)
                if newline < 0:
                    break
                line = data[start:newline]
                end = offset + newline + 1
                record = _decode(line)
                if record is None:
                    self.corrupt += 1
                    log.error("spool %s: skipping an unreadable record at byte %d", self.path, offset + start)
                elif "done" in record:
                    if isinstance(record["done"], int):
                        done = max(done, record["done"])
                else:
                    ends.append(end)
                good_end = end
                start = newline + 1
            offset += start
            tail = data[start:]
        size = os.fstat(self._fd).st_size
        if size > good_end:
            self.torn_bytes = size - good_end
            log.warning("spool %s: skipping a truncated last record (%d bytes) left by a crash",
                        self.path, self.torn_bytes)
            os.ftruncate(self._fd, good_end)
        self.size = good_end
        self._done = done
        self.pending = sum(1 for end in ends if end > done)
        if self.pending == 0 and self.size:
            self._truncate()

    def close(self) -> None:
        if self._fd is not None:
            try:
                if self.dirty:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)  # releases the lock
                self._fd = None
                self.dirty = False

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    # -- writing
    def append(self, record: dict[str, Any]) -> bool:
        """Add an event record at the end; False when the size cap is reached (or the disk
        refused the write): nothing was written then."""
        line = _encode(record)
        if self._fd is None or self.size + len(line) > self.max_bytes:
            return False
        if not self._write(line):
            return False
        self.pending += 1
        return True

    def _write(self, line: bytes) -> bool:
        assert self._fd is not None
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
        except OSError as exc:
            log.error("spool %s: write failed (%s)", self.path, exc)
            try:
                os.ftruncate(self._fd, self.size)  # no torn line for the next record to follow
            except OSError:
                pass
            return False
        self.size += len(line)
        self.dirty = True
        return True

    def sync(self) -> None:
        """fsync what was written (blocking: call it from a thread)."""
        if self._fd is not None and self.dirty:
            self.dirty = False
            os.fsync(self._fd)

    @property
    def full_share(self) -> float:
        return self.size / self.max_bytes

    # -- replaying
    def peek(self, count: int) -> list[SpoolRecord]:
        """Up to ``count`` event records not committed yet, oldest first."""
        if self._fd is None or self.pending == 0:
            return []
        out: list[SpoolRecord] = []
        offset = self._done
        tail = b""
        while len(out) < count and offset + len(tail) < self.size:
            want = min(READ_CHUNK, self.size - offset - len(tail))
            data = tail + os.pread(self._fd, want, offset + len(tail))
            start = 0
            while len(out) < count:
                newline = data.find(b"\n", start)
                if newline < 0:
                    break
                record = _decode(data[start:newline])
                end = offset + newline + 1
                start = newline + 1
                if record is not None and "done" not in record:
                    out.append(SpoolRecord(end, record))
            offset += start
            tail = data[start:]
            if start == 0 and len(data) >= self.size - offset:
                break  # no complete line left (cannot happen: the file ends with one)
        return out

    def commit(self, records: list[SpoolRecord]) -> None:
        """The records (a prefix of what peek() returned) reached Redis."""
        if not records:
            return
        self.pending = max(0, self.pending - len(records))
        self._done = records[-1].end
        if self.pending == 0:
            self._truncate()
        else:
            self._write(_encode({"done": self._done}))

    def _truncate(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        self.size = 0
        self._done = 0
        self.pending = 0
        self.dirty = True


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


def _decode(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None
