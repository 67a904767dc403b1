"""A consumer API for Earshot's Redis Streams: join a group, read typed entries, act, acknowledge.

Agent-assist, routing and call-control read ``earshot:events`` (or their own
streams) the way the SQL persister does (gateway/persister.py), and this module
is that way, packaged (docs/consumers.md):

- **Group.** :class:`StreamConsumer` joins a consumer group, creating it (and the
  stream, ``MKSTREAM``) when it is missing, from ``$`` (only what comes next) or
  ``0`` (everything the stream still holds).
- **Typed.** Each entry is decoded (:func:`gateway.events.decode_fields` and
  :meth:`~gateway.events.Event.from_wire` by default, so handlers get an
  :class:`~gateway.events.Event`); an entry that does not decode is a *poison*
  entry: logged, counted and acknowledged, never retried forever.
- **At least once.** An entry is acknowledged (``XACK``) only after the handler
  returned. A consumer that dies leaves its entries pending; it re-reads its own
  pending entries when it starts again (same ``consumer`` name), and any member of
  the group takes over the entries of a consumer idle longer than ``claim_idle_s``
  (``XAUTOCLAIM``). So an event can be handled twice (a crash between the handler
  and the ack): **handlers must be idempotent**. A bounded set of recently handled
  ids (``dedupe``, by ``event_id``) skips the duplicates one process sees; it does
  not survive a restart.
- **Handler failures.** An exception leaves the entry pending; it is retried at the
  next recovery pass (every ``claim_interval_s``) and after ``max_failures`` failed
  attempts it is acknowledged and logged as dropped (``dropped``), so a handler bug
  cannot wedge the group.
- **Clean stop.** :meth:`StreamConsumer.stop` lets the entry in hand finish and be
  acknowledged, then ends :meth:`~StreamConsumer.run`. Entries Redis delivered but the
  handler never got stay pending for the next start (or another member's XAUTOCLAIM).

:class:`StreamWriter` is the other half: a consumer's own events (``assist.suggestion``,
``routing.decision``, call-control results) written to its own stream as
:class:`ConsumerEvent` entries with stable ids, once per id (a Redis ``SET NX`` in the
same script as the ``XADD``), so a handler that runs twice publishes once.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Generic, Mapping, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from .events import Event, EventError, decode_fields

log = logging.getLogger(__name__)

T = TypeVar("T")
Fields = Mapping[bytes | str, bytes | str]
Handler = Callable[[T, "Entry"], Awaitable[None] | None]

#: the envelope of the events consumers publish on their own streams (docs/consumers.md)
CONSUMER_SCHEMA = "earshot.consumer.v1"
MAX_ID = 160


def default_consumer_name() -> str:
    """``host-pid``: unique per process. Give a stable name instead to re-read your own
    pending entries at once after a restart, rather than after ``claim_idle_s``."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Entry:
    """Where a decoded item came from: its stream entry id, and whether it was delivered before."""

    stream: str
    id: str
    redelivered: bool = False


class PoisonEntry(ValueError):
    """A stream entry the decoder refused; it is acknowledged and skipped (the message says why)."""


def _s(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def decode_event(fields: Fields) -> Event:
    """The default decoder: an Earshot event (schema v1 or v2), validated."""
    return decode_fields(fields)


def event_key(event: Event) -> str:
    return event.event_id


def is_customer(event: Event) -> bool:
    """Is this turn the customer's? A SIPREC call's turns say (``role``); a call without
    roles (a SIP call answered directly: one leg, the caller's) counts every leg but an
    ``agent`` one (Twilio's second track) as the customer's."""
    role = getattr(event.payload, "role", None)
    if role:
        return role == "customer"
    return (event.leg or "") != "agent"


class StreamConsumer(Generic[T]):
    """One member of a consumer group on one stream; see the module docstring.

    ``decode`` turns an entry's fields into the handler's item (raise ``ValueError``
    for a poison entry); ``key`` gives the id to deduplicate by (``event_id``).
    Counters (``handled``, ``duplicates``, ``poison``, ``failures``, ``dropped``,
    ``claimed``) are for metrics and tests.
    """

    def __init__(
        self,
        redis: aioredis.Redis | str,
        *,
        group: str,
        stream: str = "earshot:events",
        consumer: str | None = None,
        start: str = "$",
        decode: Callable[[Fields], T] = decode_event,  # type: ignore[assignment]
        key: Callable[[T], str] = event_key,  # type: ignore[assignment]
        batch: int = 100,
        block_ms: int = 1000,
        claim_idle_s: float = 60.0,
        claim_interval_s: float = 30.0,
        dedupe: int = 10_000,
        max_failures: int = 5,
        backoff_max_s: float = 5.0,
    ) -> None:
        if start not in ("$", "0", "0-0"):
            raise ValueError(f"start: '$' (new entries) or '0' (the whole stream), got {start!r}")
        if batch < 1 or block_ms < 1 or claim_idle_s <= 0 or claim_interval_s <= 0 or max_failures < 1:
            raise ValueError("batch, block_ms, claim_idle_s, claim_interval_s and max_failures must be positive")
        if not group:
            raise ValueError("group: a consumer group name is needed")
        self._owns_client = isinstance(redis, str)
        self.redis: aioredis.Redis = (aioredis.Redis.from_url(redis, socket_connect_timeout=2,
                                                              socket_timeout=block_ms / 1000 + 5)
                                      if isinstance(redis, str) else redis)
        self.stream = stream
        self.group = group
        self.consumer = consumer or default_consumer_name()
        self.start = start
        self.decode = decode
        self.key = key
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.claim_interval_s = claim_interval_s
        self.max_failures = max_failures
        self.backoff_max_s = backoff_max_s
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._dedupe = dedupe
        self._failed: dict[str, int] = {}  # entry id -> failed handler attempts
        self._stopping = asyncio.Event()
        self.handled = 0
        self.duplicates = 0
        self.poison = 0
        self.failures = 0
        self.dropped = 0
        self.claimed = 0
        self.running = False

    # -- life cycle
    def stop(self) -> None:
        """Ask :meth:`run` to end after the entry in hand (acked) or the read under way."""
        self._stopping.set()

    async def close(self) -> None:
        self.stop()
        if self._owns_client:
            await self.redis.aclose()

    async def ensure_group(self) -> None:
        """Create the group (and the stream) unless it exists."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
            log.info("consumer: created group %s on %s from %s", self.group, self.stream, self.start)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, handler: Handler[T]) -> None:
        """Consume until :meth:`stop` (also when stop was asked before run began); Redis errors are
        retried with back-off, never raised."""
        self.running = True
        loop = asyncio.get_running_loop()
        backoff = 0.1
        ready = False
        next_recovery = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if not ready:
                        await self.ensure_group()
                        ready = True
                    if loop.time() >= next_recovery:
                        await self.recover(handler)
                        next_recovery = loop.time() + self.claim_interval_s
                    entries = await self._read_new()
                    backoff = 0.1
                    if entries is None:
                        break  # stopped while blocked
                    await self._handle(entries, handler, redelivered=False)
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        ready = False  # stream or group deleted under us: make it again
                        continue
                    backoff = await self._failed_redis(exc, backoff)
                except (RedisError, OSError) as exc:
                    backoff = await self._failed_redis(exc, backoff)
                    next_recovery = 0.0  # what was read and not acked waits in our pending list
        finally:
            self.running = False

    async def poll(self, handler: Handler[T], block_ms: int | None = None) -> int:
        """One read of new entries and their handling (for scripts and tests); how many were read."""
        await self.ensure_group()
        reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.batch,
                                            block=block_ms)
        entries = _entries(reply)
        await self._handle(entries, handler, redelivered=False)
        return len(entries)

    async def recover(self, handler: Handler[T]) -> None:
        """Our own pending entries (read before a crash, or failed), then other consumers'
        entries idle longer than ``claim_idle_s`` (XAUTOCLAIM)."""
        last: str = "0-0"
        while not self._stopping.is_set():
            reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: last}, count=self.batch)
            raw = reply[0][1] if reply else []
            if not raw:
                break
            last = _s(raw[-1][0])
            await self._handle(_entries(reply, keep_deleted=True), handler, redelivered=True)
        start: bytes | str = "0-0"
        while not self._stopping.is_set():
            reply = await self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                                min_idle_time=self.claim_idle_ms, start_id=start, count=self.batch)
            start, claimed = reply[0], list(reply[1])
            if claimed:
                self.claimed += len(claimed)
                log.info("consumer %s/%s: claimed %d entries of an idle consumer", self.group, self.consumer,
                         len(claimed))
                await self._handle(claimed, handler, redelivered=True)
            if _s(start) == "0-0":
                break

    # -- internals
    async def _read_new(self) -> list[tuple[Any, Any]] | None:
        read = asyncio.ensure_future(self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                                           count=self.batch, block=self.block_ms))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not read.done():
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
            # a cancelled blocking read leaves its connection mid-reply: drop the pool's connections
            await self.redis.connection_pool.disconnect()
            return None
        return _entries(read.result())

    async def _failed_redis(self, exc: BaseException, backoff: float) -> float:
        log.warning("consumer %s/%s: Redis error (%s); retrying in %.1f s", self.group, self.consumer, exc, backoff)
        try:
            await asyncio.wait_for(self._stopping.wait(), backoff)
        except asyncio.TimeoutError:
            pass
        return min(backoff * 2, self.backoff_max_s)

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self._dedupe:
            self._seen.popitem(last=False)

    async def _handle(self, entries: list[tuple[Any, Any]], handler: Handler[T], *, redelivered: bool) -> None:
        for raw_id, fields in entries:
            entry_id = _s(raw_id)
            entry = Entry(self.stream, entry_id, redelivered)
            if not fields:  # pending, but trimmed or deleted from the stream: nothing to handle
                log.warning("consumer %s: pending entry %s of %s is gone from the stream; acknowledging",
                            self.group, entry_id, self.stream)
                self.poison += 1
                await self.redis.xack(self.stream, self.group, raw_id)
                continue
            try:
                item = self.decode(fields)
            except (ValueError, EventError, KeyError, TypeError) as exc:
                self.poison += 1
                log.warning("consumer %s: poison entry %s of %s acknowledged and skipped: %s", self.group, entry_id,
                            self.stream, exc)
                await self.redis.xack(self.stream, self.group, raw_id)
                continue
            key = self.key(item)
            if key in self._seen:
                self.duplicates += 1
                await self.redis.xack(self.stream, self.group, raw_id)
                continue
            try:
                result = handler(item, entry)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # the handler's bug or outage: keep pending, retry at recovery
                self.failures += 1
                count = self._failed.get(entry_id, 0) + 1
                self._failed[entry_id] = count
                if count < self.max_failures:
                    log.warning("consumer %s: handler failed on %s (%s, attempt %d of %d); left pending",
                                self.group, entry_id, exc, count, self.max_failures)
                    continue
                log.error("consumer %s: handler failed %d times on %s (%s); acknowledged and dropped",
                          self.group, count, entry_id, exc)
                self.dropped += 1
                self._failed.pop(entry_id, None)
                await self.redis.xack(self.stream, self.group, raw_id)
                continue
            self._failed.pop(entry_id, None)
            self._remember(key)
            self.handled += 1
            await self.redis.xack(self.stream, self.group, raw_id)


def _entries(reply: Any, *, keep_deleted: bool = False) -> list[tuple[Any, Any]]:
    """The (id, fields) pairs of a one-stream XREADGROUP reply (fields None: deleted, when kept)."""
    if not reply:
        return []
    return [e for e in reply[0][1] if e[0] is not None and (keep_deleted or e[1] is not None)]


# -- a consumer's own events


@dataclass(frozen=True)
class ConsumerEvent:
    """One event a consumer published on its own stream (docs/consumers.md, "Own events").

    ``event_id`` is stable (``<producer>:<key>``), so a consumer that handles an input
    twice publishes once; ``data`` is the type's own fields (JSON-compatible).
    """

    type: str
    event_id: str
    call_id: str
    producer: str
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = 0.0  # seconds since the epoch

    def __post_init__(self) -> None:
        for name, limit in (("type", 64), ("event_id", MAX_ID), ("call_id", 64), ("producer", 64)):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > limit:
                raise EventError(f"{name}: expected a non-empty string of at most {limit} characters, "
                                 f"got {value!r:.60}")
        if not isinstance(self.data, Mapping):
            raise EventError(f"data: expected an object, got {self.data!r:.60}")

    def to_wire(self) -> dict[str, Any]:
        return {"schema": CONSUMER_SCHEMA, "type": self.type, "event_id": self.event_id, "call_id": self.call_id,
                "producer": self.producer, "time": _iso(self.time), **dict(self.data)}

    def to_fields(self) -> dict[str, str]:
        return {"event_id": self.event_id, "type": self.type, "call_id": self.call_id,
                "data": json.dumps(self.to_wire(), separators=(",", ":"))}

    @classmethod
    def from_fields(cls, fields: Fields) -> ConsumerEvent:
        raw = fields.get("data", fields.get(b"data"))  # type: ignore[call-overload]
        if raw is None:
            raise EventError("data: the entry has no 'data' field")
        try:
            body = json.loads(_s(raw))
        except json.JSONDecodeError as exc:
            raise EventError(f"data: not valid JSON: {exc}") from None
        return cls.from_wire(body)

    @classmethod
    def from_wire(cls, body: Any) -> ConsumerEvent:
        if not isinstance(body, Mapping):
            raise EventError("event is not a JSON object")
        if body.get("schema") != CONSUMER_SCHEMA:
            raise EventError(f"schema: expected {CONSUMER_SCHEMA}, got {body.get('schema')!r:.60}")
        raw_time = body.get("time")
        try:
            when = datetime.fromisoformat(str(raw_time)).timestamp()
        except ValueError:
            raise EventError(f"time: not an ISO 8601 time: {raw_time!r:.60}") from None
        envelope = {"schema", "type", "event_id", "call_id", "producer", "time"}
        return cls(type=body.get("type"), event_id=body.get("event_id"), call_id=body.get("call_id"),  # type: ignore
                   producer=body.get("producer"), data={k: v for k, v in body.items() if k not in envelope},
                   time=when)


def consumer_event_key(event: ConsumerEvent) -> str:
    return event.event_id


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# KEYS: stream, call stream ("" for none), id key; ARGV: maxlen, id ttl, call maxlen, call ttl, then the fields
_WRITE_ONCE = """
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[2]) == false then return 0 end
local f = {}
for i = 5, #ARGV do f[#f + 1] = ARGV[i] end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(f))
if KEYS[2] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(f))
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return 1
"""


class StreamWriter:
    """Publishes a consumer's own :class:`ConsumerEvent`\\ s to ``stream`` (and, with
    ``per_call``, to ``<stream>:call:<call_id>`` too, which the dashboard's call view reads).

    Each event id is written once: the id is remembered for ``id_ttl_s`` (a key
    ``<stream>:id:<event_id>``) in the same Lua script as the XADD.
    """

    def __init__(self, redis: aioredis.Redis | str, stream: str, producer: str, *, per_call: bool = False,
                 maxlen: int = 100_000, call_maxlen: int = 1_000, call_ttl_s: int = 86_400,
                 id_ttl_s: int = 7 * 86_400, clock: Callable[[], float] = time.time) -> None:
        self._owns_client = isinstance(redis, str)
        self.redis: aioredis.Redis = aioredis.Redis.from_url(redis) if isinstance(redis, str) else redis
        self.stream = stream
        self.producer = producer
        self.per_call = per_call
        self.maxlen = maxlen
        self.call_maxlen = call_maxlen
        self.call_ttl_s = call_ttl_s
        self.id_ttl_s = id_ttl_s
        self.clock = clock
        self._script = self.redis.register_script(_WRITE_ONCE)
        self.written = 0
        self.duplicates = 0

    def call_stream(self, call_id: str) -> str:
        return call_stream(self.stream, call_id)

    def make(self, type: str, call_id: str, key: str, data: Mapping[str, Any]) -> ConsumerEvent:
        """The event for input ``key`` (e.g. the handled event's id plus what was decided)."""
        event_id = f"{self.producer}:{key}"
        if len(event_id) > MAX_ID:
            import hashlib

            event_id = f"{self.producer}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"
        return ConsumerEvent(type, event_id, call_id, self.producer, dict(data), self.clock())

    async def publish(self, type: str, call_id: str, key: str, data: Mapping[str, Any]) -> bool:
        """Write the event once; False when an event with its id was already written."""
        return await self.write(self.make(type, call_id, key, data))

    async def write(self, event: ConsumerEvent) -> bool:
        fields = event.to_fields()
        flat = [x for pair in fields.items() for x in pair]
        keys = [self.stream, self.call_stream(event.call_id) if self.per_call else "",
                f"{self.stream}:id:{event.event_id}"]
        added = await self._script(keys=keys, args=[self.maxlen, self.id_ttl_s, self.call_maxlen, self.call_ttl_s,
                                                    *flat])
        if added:
            self.written += 1
        else:
            self.duplicates += 1
        return bool(added)

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()


def call_stream(stream: str, call_id: str) -> str:
    """A consumer stream's per-call copy (``earshot:assist`` -> ``earshot:assist:call:<id>``)."""
    return f"{stream}:call:{call_id}"


async def read_call_events(redis: aioredis.Redis, stream: str, call_id: str, after: str = "0-0",
                           count: int = 500) -> list[tuple[str, ConsumerEvent]]:
    """The events of one call on a consumer's per-call stream after entry id ``after``
    (invalid entries skipped)."""
    out: list[tuple[str, ConsumerEvent]] = []
    start = "-" if after in ("0", "0-0", "-") else f"({after}"
    for raw_id, fields in await redis.xrange(call_stream(stream, call_id), min=start, max="+", count=count):
        try:
            out.append((_s(raw_id), ConsumerEvent.from_fields(fields)))
        except EventError as exc:
            log.debug("skipping invalid consumer entry %s: %s", _s(raw_id), exc)
    return out
