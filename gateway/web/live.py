"""Live calls for the dashboard, read from the Redis event stream (never from SQL).

One :class:`LiveHub` per gateway process reads the global stream
``<prefix>:events`` with a single blocking XREAD loop and fans every event out to
the SSE connections: a hundred supervisors watching cost one Redis reader, and
a slow browser only ever fills its own buffer. Entries are decoded and
validated once, here (:meth:`gateway.events.Event.from_wire`); an invalid one
is counted and skipped, and subscribers get the event's wire form. A call view gets every event of
its call through a bounded queue; the board gets changes coalesced per call
(:class:`BoardSubscription`). A subscriber that falls too far behind is closed
(it gets :data:`OVERFLOW`); its EventSource reconnects and starts over from a
replay, which is cheaper and more honest than silently skipping events.

:class:`LiveBoard` is the sans-I/O part: the set of active calls, fed typed
events, answering what changed. On start the hub rebuilds it from the recent
past of the stream (XREVRANGE), so a restarted gateway shows calls that were
already up. Events are deduplicated by their per-call number (delivery is
at-least-once, docs/events.md), and a call that ended stays ended even if a
retried duplicate of one of its earlier events comes later.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from ..events import CallEnded, CallStarted, Event, EventError, TurnFinal, TurnPartial, parse_fields
from ..identity import clean_event_body
from ..tasks import stop_tasks

log = logging.getLogger(__name__)

CALL_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
OVERFLOW: dict[str, Any] = {"type": "overflow"}  # sentinel put in a queue that overflowed
RESET: dict[str, Any] = {"type": "reset"}  # the stream was lost (Redis restarted empty): start over
MAX_ENDED_REMEMBERED = 10_000
REPLAY_CONNECTIONS = 4


def valid_call_id(call_id: str) -> bool:
    return isinstance(call_id, str) and CALL_ID.match(call_id) is not None


def event_number(event: dict[str, Any]) -> int:
    """The per-call event number from ``<call_id>:<NNNNNN>``; 0 when unreadable."""
    event_id = event.get("event_id")
    if not isinstance(event_id, str):
        return 0
    tail = event_id.rpartition(":")[2]
    return int(tail) if tail.isascii() and tail.isdigit() and len(tail) <= 12 else 0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class LiveCall:
    call_id: str
    from_uri: str
    to_uri: str
    tags: list[str]
    started_at: float  # wall clock of the answer (estimated when call.started was not seen)
    sip_call_id: str = ""
    source_kind: str = "sip"
    source_ids: dict[str, str] = field(default_factory=dict)
    latest_text: str = ""
    latest_partial: bool = False  # latest_text is an interim partial
    latest_turn: int = 0
    latest_leg: str = ""
    turns: int = 0  # finals seen
    last_number: int = 0  # highest event number applied (deduplication)
    last_event_at: float = 0.0  # wall clock of the newest event
    gateway: str = ""  # the gateway instance carrying it (call.started's gateway)

    def to_json(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "from": self.from_uri, "to": self.to_uri, "tags": list(self.tags),
                "started_at": _iso(self.started_at), "started_ms": int(self.started_at * 1000),
                "sip_call_id": self.sip_call_id, "source": {"kind": self.source_kind, **self.source_ids},
                "latest_text": self.latest_text,
                "latest_partial": self.latest_partial, "latest_turn": self.latest_turn, "turns": self.turns,
                "gateway": self.gateway}


@dataclass
class BoardChange:
    kind: str  # "call" (added or updated), "ended", "status" (Redis up/down) or "snapshot" (board rebuilt)
    call_id: str
    call: LiveCall | None = None

    def to_json(self) -> dict[str, Any]:
        if self.kind == "call" and self.call is not None:
            return self.call.to_json()
        return {"call_id": self.call_id}


class LiveBoard:
    """Active calls, from events in stream order."""

    def __init__(self, *, stale_after_s: float = 4 * 3600.0) -> None:
        self.calls: dict[str, LiveCall] = {}
        self.stale_after_s = stale_after_s
        self._ended: OrderedDict[str, None] = OrderedDict()

    def apply(self, event: Event | dict[str, Any]) -> BoardChange | None:
        """Apply one event (a dict is decoded first); the change to show, or None (duplicate, late, invalid)."""
        if not isinstance(event, Event):
            try:
                event = Event.from_wire(event)
            except EventError:
                return None
        call_id = event.call_id
        if not valid_call_id(call_id) or call_id in self._ended:
            return None
        payload = event.payload
        number = event.number
        when = event.created_at
        call = self.calls.get(call_id)
        if call is not None and number and number <= call.last_number:
            return None  # a duplicate from a retried publish
        if isinstance(payload, CallEnded):
            self._ended[call_id] = None
            while len(self._ended) > MAX_ENDED_REMEMBERED:
                self._ended.popitem(last=False)
            if self.calls.pop(call_id, None) is None:
                return None
            return BoardChange("ended", call_id)
        if call is None:
            started = when
            if not isinstance(payload, CallStarted):  # came in mid-call: estimate the answer time from the offset
                offset = getattr(payload, "end_ms", None)
                if offset is None:
                    offset = getattr(payload, "offset_ms", None)
                if offset is not None and offset < 86_400_000:
                    started = when - offset / 1000.0
            info = event.call
            call = LiveCall(call_id=call_id, from_uri=info.from_uri, to_uri=info.to_uri, tags=list(info.tags),
                            started_at=started, sip_call_id=info.sip_call_id, source_kind=info.source.kind,
                            source_ids=dict(info.source.ids))
            self.calls[call_id] = call
        if isinstance(payload, CallStarted):
            call.started_at = when
            call.gateway = payload.gateway or ""
        call.last_number = max(call.last_number, number)
        call.last_event_at = max(call.last_event_at, when)
        if isinstance(payload, (TurnPartial, TurnFinal)):
            final = isinstance(payload, TurnFinal)
            leg, turn, text = event.leg or "", payload.turn, payload.text
            if final:
                call.turns += 1
            # the newest words win; an empty final only clears its own turn's partial
            if text or (final and (call.latest_leg, call.latest_turn) == (leg, turn)):
                call.latest_text = text
                call.latest_partial = not final
                call.latest_turn, call.latest_leg = turn, leg
        return BoardChange("call", call_id, call)

    def expire(self, now: float) -> list[BoardChange]:
        """Drop calls silent for ``stale_after_s`` (their gateway died before call.ended)."""
        gone = [c for c in self.calls.values() if now - max(c.last_event_at, c.started_at) > self.stale_after_s]
        for call in gone:
            del self.calls[call.call_id]
        return [BoardChange("ended", c.call_id) for c in gone]

    def active(self) -> list[LiveCall]:
        """Active calls, newest first."""
        return sorted(self.calls.values(), key=lambda c: (c.started_at, c.call_id), reverse=True)

    def clear(self) -> None:
        self.calls.clear()
        self._ended.clear()


class Subscription:
    """One SSE connection following one call: a bounded queue of its events, in order."""

    def __init__(self, hub: LiveHub, call_id: str | None, maxsize: int) -> None:
        self.hub = hub
        self.call_id = call_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        self.overflowed = False
        self.closed = False

    def offer(self, item: Any) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True
            self.hub.stats.overflows += 1
            self._end(OVERFLOW)

    def _end(self, sentinel: dict[str, Any]) -> None:
        """Replace whatever is queued by ``sentinel`` and detach from the hub."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(sentinel)
        self.close()

    async def get(self, timeout: float | None = None) -> Any:
        """The next item; None on timeout (time for a keep-alive)."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BoardSubscription:
    """One SSE connection following the board: changes coalesced by call.

    The board only shows each call's latest state, so a burst of events for a
    call (or a hundred calls talking at once) is one pending update per call:
    the backlog is bounded by the number of calls, not by the event rate, and a
    slow browser simply sees fewer intermediate states. Only a backlog beyond
    ``max_pending`` calls closes it.
    """

    call_id = None

    def __init__(self, hub: LiveHub, max_pending: int) -> None:
        self.hub = hub
        self.max_pending = max_pending
        self.overflowed = False
        self.closed = False
        self._pending: OrderedDict[str, BoardChange] = OrderedDict()
        self._sentinel: dict[str, Any] | None = None
        self._wakeup = asyncio.Event()

    @property
    def pending(self) -> int:
        return len(self._pending) + (self._sentinel is not None)

    def offer(self, change: BoardChange) -> None:
        if self.closed:
            return
        if change.kind == "snapshot":
            self._pending.clear()  # a snapshot carries every call
        key = change.call_id if change.kind in ("call", "ended") else "\0" + change.kind
        self._pending[key] = change
        self._pending.move_to_end(key)
        if len(self._pending) > self.max_pending:
            self.overflowed = True
            self.hub.stats.overflows += 1
            self._end(OVERFLOW)
            return
        self._wakeup.set()

    def _end(self, sentinel: dict[str, Any]) -> None:
        self._pending.clear()
        self._sentinel = sentinel
        self._wakeup.set()
        self.close()

    async def get(self, timeout: float | None = None) -> Any:
        """The next change (or sentinel); None on timeout."""
        if not self._pending and self._sentinel is None:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        if self._pending:
            return self._pending.popitem(last=False)[1]
        return self._sentinel

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub._unsubscribe(self)


@dataclass
class HubStats:
    entries: int = 0
    bad_entries: int = 0
    overflows: int = 0
    redis_failures: int = 0
    rebuilds: int = 0
    reads: int = 0


class LiveHub:
    """The one Redis reader of a process, and the fan-out to its subscribers."""

    def __init__(
        self,
        redis_url: str,
        *,
        events_stream: str,
        call_stream: Callable[[str], str],
        rebuild_window_s: float = 4 * 3600.0,
        rebuild_max_entries: int = 20_000,
        queue_size: int = 256,
        max_board_pending: int = 10_000,
        block_ms: int = 1000,
        replay_max_entries: int = 5000,
        stale_after_s: float = 4 * 3600.0,
        wall: Callable[[], float] = time.time,
        client_name: str = "earshot-livehub",
    ) -> None:
        self.redis_url = redis_url
        self.client_name = client_name
        self.events_stream = events_stream
        self.call_stream = call_stream
        self.rebuild_window_s = rebuild_window_s
        self.rebuild_max_entries = rebuild_max_entries
        self.queue_size = queue_size
        self.max_board_pending = max_board_pending
        self.block_ms = block_ms
        self.replay_max_entries = replay_max_entries
        self.wall = wall
        self.board = LiveBoard(stale_after_s=stale_after_s)
        self.stats = HubStats()
        self.redis_ok = False
        self.ready = asyncio.Event()  # set once the board was rebuilt
        self._last_id: str | None = None
        self._board_subs: set[BoardSubscription] = set()
        self._call_subs: dict[str, set[Subscription]] = {}
        self._redis: Any = None
        self._replay_redis: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- life cycle
    async def start(self) -> None:
        """Start reading in the background; never fails because Redis is down."""
        import redis.asyncio as aioredis

        if self._task is not None:
            raise RuntimeError("LiveHub already started")
        self._redis = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=2,
                                              socket_timeout=self.block_ms / 1000 + 5, client_name=self.client_name)
        # replays (a call view opening) use a small pool of their own: many browsers
        # opening at once wait for a connection instead of opening one each
        pool = aioredis.BlockingConnectionPool.from_url(
            self.redis_url, max_connections=REPLAY_CONNECTIONS, timeout=10, socket_connect_timeout=2,
            socket_timeout=10, client_name=f"{self.client_name}-replay")
        self._replay_redis = aioredis.Redis(connection_pool=pool)
        self._task = asyncio.create_task(self._run(), name="earshot-livehub")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            # let the blocked XREAD return by itself (block_ms): a cancelled read leaves its
            # connection out of the pool, open, and redis-py may turn the cancellation into
            # a ConnectionError; cancel only if it does not stop in time
            await asyncio.wait([self._task], timeout=self.block_ms / 1000 + 1.0)
            if not self._task.done():
                await stop_tasks([self._task])
            self._task = None
        for sub in list(self._board_subs) + [s for subs in self._call_subs.values() for s in subs]:
            sub._end(RESET)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._replay_redis is not None:
            await self._replay_redis.aclose()
            await self._replay_redis.connection_pool.disconnect()
            self._replay_redis = None

    # -- subscribers
    def subscribe_board(self) -> BoardSubscription:
        """Board changes from now on."""
        sub = BoardSubscription(self, self.max_board_pending)
        self._board_subs.add(sub)
        return sub

    def subscribe(self, call_id: str) -> Subscription:
        """One call's events from now on."""
        sub = Subscription(self, call_id, self.queue_size)
        self._call_subs.setdefault(call_id, set()).add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription | BoardSubscription) -> None:
        if isinstance(sub, BoardSubscription):
            self._board_subs.discard(sub)
        else:
            subs = self._call_subs.get(sub.call_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._call_subs[sub.call_id]

    @property
    def subscribers(self) -> int:
        return len(self._board_subs) + sum(len(s) for s in self._call_subs.values())

    def active(self) -> list[LiveCall]:
        return self.board.active()

    async def gateways(self, prefix: str, *, heartbeat_s: float, lost_after_s: float) -> list[dict[str, Any]]:
        """Every gateway instance in the registry (alive, draining, silent, lost) with the board's
        calls on each (``board_calls``); [] while Redis is unreachable."""
        from ..instances import read_instances

        if self._replay_redis is None:
            return []
        try:
            views = await read_instances(self._replay_redis, prefix, heartbeat_s=heartbeat_s,
                                         lost_after_s=lost_after_s)
        except Exception as exc:  # Redis down: the board still shows its calls
            log.debug("gateway registry unreadable: %s", exc)
            return []
        on_board: dict[str, int] = {}
        for call in self.board.calls.values():
            on_board[call.gateway] = on_board.get(call.gateway, 0) + 1
        return [{**v.to_dict(), "board_calls": on_board.get(v.instance, 0)} for v in views]

    def get(self, call_id: str) -> LiveCall | None:
        return self.board.calls.get(call_id)

    async def replay(self, call_id: str) -> list[dict[str, Any]]:
        """The events of one call so far, from its own stream (XRANGE); raises on Redis errors."""
        from redis.exceptions import RedisError

        if self._replay_redis is None or not valid_call_id(call_id):
            return []
        events: list[dict[str, Any]] = []
        start = "-"
        try:
            while len(events) < self.replay_max_entries:
                batch = await self._replay_redis.xrange(self.call_stream(call_id), min=start, max="+", count=500)
                if not batch:
                    break
                for entry_id, fields in batch:
                    event = self._decode(fields)
                    if event is not None:
                        events.append(event.to_wire())
                if len(batch) < 500:
                    break
                start = "(" + _id(batch[-1][0])
        except (RedisError, OSError) as exc:
            raise ConnectionError(f"Redis: {exc}") from None
        return events

    # -- the reader
    def _decode(self, fields: Any) -> Event | None:
        try:
            # an entry not cleaned at ingress (older producer) must not break the pages: see gateway/identity.py
            return Event.from_wire(clean_event_body(parse_fields(fields or {})))
        except (ValueError, UnicodeDecodeError, RecursionError):  # EventError and JSONDecodeError are ValueErrors
            self.stats.bad_entries += 1
            return None

    def dispatch(self, event: Event) -> None:
        """Apply one event to the board and hand its wire form to the subscribers concerned."""
        self.stats.entries += 1
        change = self.board.apply(event)
        if change is not None:
            for sub in list(self._board_subs):
                sub.offer(change)
        subs = self._call_subs.get(event.call_id)
        if subs:
            wire = event.to_wire()
            for sub in list(subs):
                sub.offer(wire)

    def _broadcast_status(self) -> None:
        for sub in list(self._board_subs):
            sub.offer(BoardChange("status", ""))

    async def _rebuild(self) -> None:
        """Fill the board from the recent past of the stream, and set the read position."""
        newest = await self._redis.xrevrange(self.events_stream, count=1)
        self._last_id = _id(newest[0][0]) if newest else "0-0"
        self.board.clear()
        floor_ms = max(0, int((self.wall() - self.rebuild_window_s) * 1000))
        entries: list[Any] = []
        top = "+"
        while len(entries) < self.rebuild_max_entries:
            batch = await self._redis.xrevrange(self.events_stream, max=top, min=f"{floor_ms}-0",
                                                count=min(1000, self.rebuild_max_entries - len(entries)))
            if not batch:
                break
            entries.extend(batch)
            top = "(" + _id(batch[-1][0])
            if len(batch) < 1000:
                break
        entries = [e for e in entries if _id_key(_id(e[0])) <= _id_key(self._last_id)]
        for entry_id, fields in reversed(entries):
            event = self._decode(fields)
            if event is not None:
                self.board.apply(event)
        self.board.expire(self.wall())
        self.stats.rebuilds += 1
        log.info("live board rebuilt from %d recent events: %d active calls", len(entries), len(self.board.calls))
        for sub in list(self._board_subs):
            sub.offer(BoardChange("snapshot", ""))
        self.ready.set()

    async def _stream_was_reset(self) -> bool:
        """True when Redis lost the stream (restarted empty) so our read position is in its future."""
        newest = await self._redis.xrevrange(self.events_stream, count=1)
        top = _id(newest[0][0]) if newest else "0-0"
        return self._last_id is not None and _id_key(top) < _id_key(self._last_id)

    async def _run(self) -> None:
        from redis.exceptions import RedisError

        backoff = 0.2
        next_expiry = 0.0
        while not self._closing:
            try:
                if self._last_id is None:
                    await self._rebuild()
                elif not self.redis_ok and await self._stream_was_reset():
                    for subs in list(self._call_subs.values()):
                        for sub in list(subs):
                            sub._end(RESET)
                    await self._rebuild()
                if not self.redis_ok:
                    self.redis_ok = True
                    self._broadcast_status()
                reply = await self._redis.xread({self.events_stream: self._last_id}, count=500, block=self.block_ms)
                self.stats.reads += 1
                backoff = 0.2
                for _stream, entries in reply or []:
                    for entry_id, fields in entries:
                        self._last_id = _id(entry_id)
                        event = self._decode(fields)
                        if event is not None:
                            self.dispatch(event)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self._closing:
                    return
                self.stats.redis_failures += 1
                if self.redis_ok:
                    log.warning("live hub lost Redis (%s); retrying", exc)
                    self.redis_ok = False
                    self._broadcast_status()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug must not kill the only reader
                log.exception("live hub: unexpected error")
                await asyncio.sleep(1.0)
            now = self.wall()
            if now >= next_expiry:
                next_expiry = now + 60.0
                for change in self.board.expire(now):
                    for sub in list(self._board_subs):
                        sub.offer(change)


def _id(value: bytes | str) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
