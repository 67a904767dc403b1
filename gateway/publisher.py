"""Publishes events to Redis Streams without ever stalling a call, and without losing them.

Calls hand events to :meth:`Publisher.publish`, which only appends to a bounded
in-memory queue. One writer task drains it in order, writing each batch to the
global stream and to each call's own stream in one Lua script (atomic, like
the MULTI/EXEC it replaces).

Durability (docs/events.md, Delivery): the queue moves to a local spool file
(:mod:`gateway.spool`) when it is full, when Redis has been unreachable for
``spool_after_s``, and at close; while the spool holds events every new event
goes there too, so the order is kept, and the writer replays the spool (at
start too) before it takes from memory again. Partials are never spooled: a
partial that old is superseded by its final. With the spool full too, events
are refused and counted (an alarm, never silence).

Exactly once: every event gets ``(origin, seq)`` when accepted (origin: this
publisher, seq: its count). The script writes an event only if its seq is
above the origin's high-water mark in Redis and raises the mark in the same
script, so a retry after a lost reply or a replay after a crash never writes
an event twice.

Trimming (``maxlen``) never removes entries the ``protect_group`` consumer
group (the persister) has not acknowledged: the writer trims with MINID up to
the group's oldest pending / first undelivered entry, keeps what it must over
``maxlen`` and says so (``trim_held``). It also reads the group's lag, and
notices entries someone else trimmed before the group read them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from .config import mask_url
from .events import CALL_ENDED, TURN_PARTIAL, Event
from .spool import Spool, SpoolError, SpoolRecord
from .tasks import stop_tasks

log = logging.getLogger(__name__)

#: how long Redis remembers an origin's high-water mark: a spool replayed later than
#: this after the events' first attempt could write its last uncommitted batch twice
MARK_TTL_S = 7 * 86_400
TRIM_STEP = 10_000  # entries one trim pass removes at most
ALARM_EVERY_S = 60.0
FSYNC_EVERY_S = 1.0

# KEYS: per event (events stream, call stream, mark key); ARGV: count, call maxlen, call ttl, mark ttl,
# then per event: seq, ended (0/1), event_id, type, call_id, data. Returns the number written.
_WRITE = """
local n = tonumber(ARGV[1])
local written = 0
local a = 5
for i = 1, n do
  local k = 3 * (i - 1)
  local seq = tonumber(ARGV[a])
  local mark = tonumber(redis.call('GET', KEYS[k + 3]) or '0')
  if seq > mark then
    redis.call('XADD', KEYS[k + 1], '*', 'event_id', ARGV[a + 2], 'type', ARGV[a + 3],
               'call_id', ARGV[a + 4], 'data', ARGV[a + 5])
    redis.call('XADD', KEYS[k + 2], 'MAXLEN', '~', ARGV[2], '*', 'event_id', ARGV[a + 2],
               'type', ARGV[a + 3], 'call_id', ARGV[a + 4], 'data', ARGV[a + 5])
    if ARGV[a + 1] == '1' then redis.call('EXPIRE', KEYS[k + 2], ARGV[3]) end
    redis.call('SET', KEYS[k + 3], ARGV[a], 'EX', ARGV[4])
    written = written + 1
  end
  a = a + 6
end
return written
"""

# KEYS[1]: stream; ARGV: maxlen, last entry that may go ('+', or an id, '(' + id: exclusive), step.
# Removes the oldest entries over maxlen, none after ARGV[2]. Returns {removed, held back}.
_TRIM = """
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return {0, 0} end
local want = math.min(excess, tonumber(ARGV[3]))
local old = redis.call('XRANGE', KEYS[1], '-', ARGV[2], 'COUNT', want)
local removed = 0
if #old > 0 then
  local last = old[#old][1]
  local dash = string.find(last, '-', 1, true)
  local after = string.sub(last, 1, dash - 1) .. '-' .. string.format('%d', tonumber(string.sub(last, dash + 1)) + 1)
  removed = redis.call('XTRIM', KEYS[1], 'MINID', after)
end
local held = 0
if #old < want then held = excess - removed end
return {removed, held}
"""


@dataclass(frozen=True, slots=True)
class Pending:
    """An accepted event in its wire form, numbered for exactly-once writing."""

    origin: str
    seq: int
    event_id: str
    type: str
    call_id: str
    body: dict[str, Any]  # Event.to_dict() without latency_ms
    speech_end: float | None  # time.monotonic() the speaker stopped (turn.final): latency_ms at write
    streams: tuple[str, str]  # the global stream and the call's own

    @property
    def mark(self) -> str:
        """The origin's high-water mark key, beside the streams (``earshot:publisher:<origin>``)."""
        prefix = self.streams[0].rpartition(":")[0] or self.streams[0]
        return f"{prefix}:publisher:{self.origin}"

    def to_record(self) -> dict[str, Any]:
        # the streams go along, so a replay writes where the event was meant to go whatever the
        # configuration is by then
        record: dict[str, Any] = {"s": self.seq, "o": self.origin, "x": self.streams[0], "c": self.streams[1],
                                  "e": self.body}
        if self.speech_end is not None:  # monotonic clocks do not survive a restart: keep wall time
            record["t"] = time.time() - (time.monotonic() - self.speech_end)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Pending:
        body = record["e"]
        wall = record.get("t")
        speech_end = time.monotonic() - (time.time() - wall) if isinstance(wall, (int, float)) else None
        return cls(str(record["o"]), int(record["s"]), str(body["event_id"]), str(body["type"]),
                   str(body["call_id"]), body, speech_end, (str(record["x"]), str(record["c"])))


@dataclass(frozen=True)
class GroupState:
    """Where the protected consumer group stands on the stream (XINFO), for metrics and /healthz."""

    lag: int | None  # entries not delivered to the group yet (None: Redis cannot tell)
    pending: int  # delivered, not acknowledged
    last_delivered: str

    @property
    def unacked(self) -> int | None:
        return None if self.lag is None else self.lag + self.pending


def _id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else str(value)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Publisher:
    def __init__(
        self,
        redis_url: str,
        *,
        events_stream: str,
        call_stream: Callable[[str], str],
        maxlen: int = 100_000,
        call_maxlen: int = 2_000,
        call_ttl_s: int = 86_400,
        buffer_limit: int = 1_000_000,
        batch_size: int = 256,
        on_published: Callable[[str, float], None] | None = None,
        spool_path: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = 1 << 30,
        spool_after_s: float = 5.0,
        protect_group: str | None = None,
        trim_interval_s: float = 1.0,
        origin: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.events_stream = events_stream
        self._call_stream = call_stream
        self.maxlen = maxlen
        self.call_maxlen = call_maxlen
        self.call_ttl_s = call_ttl_s
        self.buffer_limit = buffer_limit
        self.batch_size = batch_size
        self.on_published = on_published  # (event type, seconds from end of speech; NaN if none)
        self.spool_path = Path(spool_path) if spool_path is not None else None
        self.spool_max_bytes = spool_max_bytes
        self.spool_after_s = spool_after_s
        self.protect_group = protect_group
        self.trim_interval_s = trim_interval_s
        self.origin = origin or uuid.uuid4().hex[:16]
        self._seq = 0
        self._queue: collections.deque[Pending] = collections.deque()
        self._generation = 0  # bumped when the queue moves to the spool
        self.spool: Spool | None = None
        self._spooling = False  # every new event goes to the spool (it holds older ones)
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._client: aioredis.Redis | None = None
        self._write_script: Any = None
        self._trim_script: Any = None
        self._down_since: float | None = None
        self._next_trim = 0.0
        self._next_sync = 0.0
        self._alarms: dict[str, float] = {}
        self._spool_retry_at = 0.0  # after a failed open, not again before this (monotonic)
        self._lost_at: tuple[str, int] = ("", 0)  # (last delivered id, loss already counted there)
        # counters and gauges (read by metrics and tests)
        self.published = 0
        self.dropped_partials = 0
        self.failures = 0
        self.connected = False
        self.refused = 0  # events lost because memory and spool were both full
        self.spooled = 0  # events written to the spool (total)
        self.replayed = 0  # events published from the spool
        self.duplicates = 0  # events Redis already had (a retry or replay): skipped
        self.spool_full = False
        self.spool_error = ""  # why there is no spool, when one was asked for
        self.group: GroupState | None = None
        self.trim_held = 0  # entries over maxlen kept because the group has not read them
        self.trimmed_unread = 0  # entries found trimmed (by someone) before the group read them

    # -- producer side (call path): never blocks on Redis, never raises on Redis trouble
    def publish(self, event: Event) -> None:
        partial = event.type == TURN_PARTIAL
        if partial and (self._spooling or len(self._queue) >= self.buffer_limit):
            # superseded by their final anyway: never spooled, dropped when memory is full
            self.dropped_partials += 1
            return
        self._seq += 1
        body = event.to_dict()
        body.pop("latency_ms", None)
        item = Pending(self.origin, self._seq, event.event_id, event.type, event.call_id, body,
                       event.speech_end_monotonic, (self.events_stream, self._call_stream(event.call_id)))
        if not self._spooling and len(self._queue) >= self.buffer_limit:
            self._start_spooling(f"the publish buffer is full ({self.buffer_limit} events)")
        if self._spooling:
            self._to_spool(item)
        else:
            if len(self._queue) >= self.buffer_limit:
                self._alarm("unbounded", "publish buffer full and no spool (%s): keeping finals in memory",
                            self.spool_error or "publish_spool_file unset")
            self._queue.append(item)
        self._idle.clear()
        self._wakeup.set()

    @property
    def backlog(self) -> int:
        """Events waiting to reach Redis, in memory and in the spool."""
        return len(self._queue) + self.spooled_backlog

    @property
    def spooled_backlog(self) -> int:
        return self.spool.pending if self.spool is not None else 0

    # -- lifecycle
    async def start(self) -> None:
        self._client = aioredis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)
        self._write_script = self._client.register_script(_WRITE)
        self._trim_script = self._client.register_script(_TRIM)
        path = self.spool_path
        if path is not None:
            # opened now only if it holds something (else when first needed): a gateway that never
            # spools never creates the file or holds its lock
            if path.exists() and path.stat().st_size > 0:
                await asyncio.to_thread(self._open_spool)
                if self.spool is not None and self.spool.pending:
                    log.info("replaying %d events spooled in %s", self.spool.pending, path)
                    self._spooling = True
                    self._idle.clear()
            elif not _creatable(path):
                self.spool_error = f"cannot create the spool file {path}: its directory is not writable"
                log.error("%s (publish_spool_file): events wait in memory only while Redis is down",
                          self.spool_error)
        self._task = asyncio.create_task(self._run(), name="earshot-publisher")

    async def ping(self) -> bool:
        if self._client is None:
            return False
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything accepted so far reached Redis; False on timeout."""
        if self._idle.is_set():
            return True
        if timeout is not None and timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self, timeout: float = 10.0) -> None:
        """Publish what is waiting for up to ``timeout`` (not at all while Redis is down); what is
        left goes to the spool, replayed at the next start."""
        flushed = await self.flush(timeout if self.connected or self._down_since is None else 0)
        if self._task is not None:
            await stop_tasks([self._task])  # redis-py may swallow one cancel (gateway/tasks.py)
        if not flushed:
            left = self.backlog
            self._spool_retry_at = 0.0  # one more try, whatever failed before
            if self._start_spooling("closing"):
                assert self.spool is not None
                log.error("closing with %d events not yet published to Redis; they are in the spool %s "
                          "and are published at the next start", left, self.spool.path)
            else:
                log.error("closing with %d events not yet published to Redis (no spool: they are lost)", left)
        if self.spool is not None:
            await asyncio.to_thread(self._close_spool)
        if self._client is not None:
            await self._client.aclose()

    # -- the spool
    def _open_spool(self) -> bool:
        if self.spool is not None:
            return True
        if self.spool_path is None or time.monotonic() < self._spool_retry_at:
            return False
        spool = Spool(self.spool_path, self.spool_max_bytes)
        try:
            spool.open()
        except SpoolError as exc:
            if not self.spool_error:
                log.error("%s: events wait in memory only while Redis is down", exc)
            self.spool_error = str(exc)
            self._spool_retry_at = time.monotonic() + 10.0
            return False
        self.spool, self.spool_error = spool, ""
        return True

    def _start_spooling(self, reason: str) -> bool:
        """Move the memory queue to the spool; from now on new events go there too."""
        if not self._open_spool():
            return False
        assert self.spool is not None
        if not self._spooling:
            log.warning("spooling events to %s: %s", self.spool.path, reason)
        self._spooling = True
        self._generation += 1
        queue, self._queue = self._queue, collections.deque()
        for item in queue:
            if item.type == TURN_PARTIAL:
                self.dropped_partials += 1
            else:
                self._to_spool(item)
        return True

    def _to_spool(self, item: Pending) -> None:
        assert self.spool is not None
        if self.spool.append(item.to_record()):
            self.spooled += 1
            return
        self.refused += 1
        if not self.spool_full:
            self.spool_full = True
            log.error("publish spool %s is full (%d MB, publish_spool_max_mb): events are being lost until "
                      "Redis takes the backlog", self.spool.path, self.spool_max_bytes >> 20)

    def _close_spool(self) -> None:
        assert self.spool is not None
        if self.spool.size == 0:  # nothing left to replay: leave no file behind
            try:
                self.spool.path.unlink()
            except OSError:
                pass
        self.spool.close()

    async def _sync(self, now: float) -> None:
        if self.spool is not None and self.spool.dirty and now >= self._next_sync:
            self._next_sync = now + FSYNC_EVERY_S
            try:
                await asyncio.to_thread(self.spool.sync)
            except OSError as exc:
                log.error("spool %s: fsync failed (%s)", self.spool.path, exc)

    # -- writer
    def _next_batch(self) -> tuple[list[Pending], list[SpoolRecord] | None, int]:
        if self._queue:
            n = min(self.batch_size, len(self._queue))
            return [self._queue[i] for i in range(n)], None, self._generation
        if self.spool is not None and self.spool.pending:
            records = self.spool.peek(self.batch_size)
            if not records:  # cannot happen (the count and the file agree); never spin on it
                log.error("spool %s: %d events counted but none readable; starting it afresh",
                          self.spool.path, self.spool.pending)
                self.spool.commit([SpoolRecord(self.spool.size, {})] * self.spool.pending)
                return [], None, self._generation
            batch: list[Pending] = []
            for record in records:
                try:
                    batch.append(Pending.from_record(record.data))
                except (KeyError, TypeError, ValueError):
                    log.error("spool %s: skipping a record that is not an event", self.spool.path)
                    batch.append(Pending("", 0, "", "", "", {}, None, ("", "")))  # committed, not sent
            return batch, records, self._generation
        if self._spooling:
            self._spooling = False  # all replayed: back to memory
        return [], None, self._generation

    async def _run(self) -> None:
        backoff = 0.1
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            await self._sync(now)
            if self._down_since is None and now >= self._next_trim:
                self._next_trim = now + self.trim_interval_s
                await self._maintain_stream()
            batch, records, generation = self._next_batch()
            if not batch:
                self._idle.set()
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self.trim_interval_s)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                published_at, written = await self._write(batch)
            except (RedisError, OSError) as exc:
                self.failures += 1
                if self.connected:
                    log.warning("Redis write failed (%s); keeping %d events and retrying", exc, self.backlog)
                self.connected = False
                if self._down_since is None:
                    self._down_since = time.monotonic()
                elif (self._queue and self.spool_path is not None
                      and time.monotonic() - self._down_since >= self.spool_after_s):
                    self._start_spooling(f"Redis unreachable for {time.monotonic() - self._down_since:.0f} s")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not self.connected:
                log.info("Redis reachable at %s", mask_url(self.redis_url))
            self.connected = True
            self._down_since = None
            backoff = 0.1
            if records is not None:
                assert self.spool is not None
                self.spool.commit(records)
                self.replayed += len(batch)
                if self.spool_full and self.spool.size < self.spool.max_bytes // 2:
                    self.spool_full = False
                    log.info("publish spool %s has room again", self.spool.path)
            elif generation == self._generation:
                for _ in batch:
                    self._queue.popleft()
            # else: the queue moved to the spool meanwhile; the replay's copies are skipped by Redis
            self.published += written
            self.duplicates += sum(1 for item in batch if item.seq) - written
            if self.on_published is not None:
                for item in batch:
                    if not item.seq:
                        continue
                    latency = published_at - item.speech_end if item.speech_end is not None else float("nan")
                    try:
                        self.on_published(item.type, latency)
                    except Exception:  # a metrics hook must not break publishing
                        log.exception("on_published hook failed")

    async def _write(self, batch: list[Pending]) -> tuple[float, int]:
        assert self._client is not None
        published_at = time.monotonic()
        keys: list[str] = []
        args: list[Any] = [0, self.call_maxlen, self.call_ttl_s, MARK_TTL_S]
        count = 0
        for item in batch:
            if not item.seq:
                continue
            body = item.body
            if item.speech_end is not None:
                body = {**body, "latency_ms": round((published_at - item.speech_end) * 1000.0, 1)}
            keys += [item.streams[0], item.streams[1], item.mark]
            args += [item.seq, 1 if item.type == CALL_ENDED else 0, item.event_id, item.type, item.call_id,
                     _json(body)]
            count += 1
        if not count:
            return published_at, 0
        args[0] = count
        written = await self._write_script(keys=keys, args=args)
        return published_at, int(written)

    # -- the stream: trimming that spares the persister, its lag, entries lost to someone else's trim
    async def _maintain_stream(self) -> None:
        try:
            self.group = await self._read_group() if self.protect_group else None
            await self._trim()
        except ResponseError as exc:
            if "no such key" not in str(exc).lower():
                log.warning("could not trim %s (%s)", self.events_stream, exc)
        except (RedisError, OSError):
            self.group = None  # unknown until Redis answers again; the writer finds out and retries

    async def _read_group(self) -> GroupState | None:
        assert self._client is not None
        groups = await self._client.xinfo_groups(self.events_stream)
        info = next((g for g in groups if _text(g.get("name")) == self.protect_group), None)
        if info is None:
            return None
        stream = await self._client.xinfo_stream(self.events_stream)
        lag, length = info.get("lag"), int(stream.get("length") or 0)
        # Redis counts entries trimmed unread in the lag for good: no more than the stream holds
        state = GroupState(min(int(lag), length) if lag is not None else None, int(info.get("pending") or 0),
                           _text(info.get("last-delivered-id") or "0-0"))
        self._check_lost(state, info, stream)
        return state

    def _check_lost(self, state: GroupState, info: dict[Any, Any], stream: dict[Any, Any]) -> None:
        """Entries trimmed before the group read them: the group's next entry is no longer in the
        stream, and the stream holds fewer entries after it than were added after it."""
        first = stream.get("first-entry")
        added, read = stream.get("entries-added"), info.get("entries-read")
        if not first or added is None or read is None:
            return
        if _id(first[0]) <= _id(state.last_delivered):
            return
        lost = int(added) - int(read) - int(stream.get("length") or 0)
        seen_at, seen = self._lost_at
        already = seen if seen_at == state.last_delivered else 0
        if lost > already:
            self.trimmed_unread += lost - already
            self._lost_at = (state.last_delivered, lost)
            log.error("%d entries of %s were trimmed before consumer group %s read them (after %s): "
                      "they are not in the store; something else trims this stream (another gateway's "
                      "stream_maxlen, or XTRIM by hand)", lost - already, self.events_stream,
                      self.protect_group, state.last_delivered)

    async def _trim(self) -> None:
        assert self._client is not None
        group = self.group
        if group is None:
            last = "+"
        elif group.pending:
            summary = await self._client.xpending(self.events_stream, self.protect_group)
            low = summary.get("min") if isinstance(summary, dict) else None
            last = f"({_text(low)}" if low else group.last_delivered
        else:
            last = group.last_delivered
        removed, held = await self._trim_script(keys=[self.events_stream], args=[self.maxlen, last, TRIM_STEP])
        self.trim_held = int(held)
        if self.trim_held:
            self._alarm("held", "consumer group %s is %s entries behind on %s: keeping %d entries over "
                        "stream_maxlen until it reads them", self.protect_group,
                        group.unacked if group is not None else "?", self.events_stream, self.trim_held)

    def _alarm(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._alarms.get(kind, -ALARM_EVERY_S) >= ALARM_EVERY_S:
            self._alarms[kind] = now
            log.warning(message, *args)

    def snapshot(self) -> dict[str, float]:
        """The publisher's numbers for metrics (gateway/metrics.py) and /healthz."""
        out = {
            "publish_backlog": self.backlog,
            "publish_spooled": self.spooled_backlog,
            "publish_spool_bytes": self.spool.size if self.spool is not None else 0,
            "publish_spool_full": 1.0 if self.spool_full else 0.0,
            "publish_spool_ok": 0.0 if self.spool_error else 1.0,
            "published_events": self.published,
            "dropped_partials": self.dropped_partials,
            "publish_refused": self.refused,
            "publish_replayed": self.replayed,
            "publish_duplicates": self.duplicates,
            "stream_trim_held": self.trim_held,
            "stream_trimmed_unread": self.trimmed_unread,
        }
        if self.group is not None and self.group.unacked is not None:
            out["persister_lag"] = self.group.unacked
        return out


def _creatable(path: Path) -> bool:
    """Whether the file could be created: its nearest existing directory is writable."""
    directory = path.absolute().parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return os.access(directory, os.W_OK)


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))
