"""Agent-assist suggestions beside the live call view (docs/consumers.md, "Agent assist").

An agent-assist consumer (examples/agent_assist.py) writes ``assist.suggestion``
events to ``<stream_prefix>:assist`` and to each call's own copy,
``<stream_prefix>:assist:call:<call_id>`` (:class:`gateway.consumer.StreamWriter`
with ``per_call``). The call page opens ``/calls/<id>/assist/stream``: the call's
suggestions so far, then new ones as they are written, as SSE ``suggestion``
frames whose ids are the Redis entry ids (a reconnect with ``Last-Event-ID`` is
not sent what it has).

Unlike transcripts (one shared reader, :class:`~gateway.web.live.LiveHub`), each
open call view blocks on its call's own small stream: suggestions are few, and
a call view is opened by the supervisor watching that call, not by every browser.
"""

from __future__ import annotations

import re
import time
from typing import Any, AsyncIterator, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..consumer import ConsumerEvent, call_stream
from ..events import EventError
from .stream import RETRY_MS, UNAUTHORIZED, Alive, _Recheck, sse

SUGGESTION = "assist.suggestion"
_ENTRY_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


def valid_entry_id(value: str) -> bool:
    return bool(_ENTRY_ID.match(value))


def suggestion_json(entry_id: str, event: ConsumerEvent) -> dict[str, Any]:
    """What the page shows: the suggestion's own fields and where it came from."""
    return {"id": entry_id, "event_id": event.event_id, "call_id": event.call_id, "time": event.time, **event.data}


class AssistFeed:
    """Reads the per-call suggestion streams for the dashboard; one client, one blocking read per open view."""

    def __init__(self, redis_url: str, stream: str) -> None:
        self.redis_url = redis_url
        self.stream = stream
        self._redis: aioredis.Redis | None = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=None)
        return self._redis

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def _frames(self, entries: Any) -> tuple[list[str], str | None]:
        frames, last = [], None
        for raw_id, fields in entries:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            last = entry_id
            try:
                event = ConsumerEvent.from_fields(fields)
            except EventError:
                continue  # not a suggestion someone could read: skipped
            if event.type == SUGGESTION:
                frames.append(sse("suggestion", suggestion_json(entry_id, event), id=entry_id))
        return frames, last

    async def events(self, call_id: str, last_id: str, keepalive_s: float, *, alive: Alive | None = None,
                     recheck_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> AsyncIterator[str]:
        """The call's suggestions after ``last_id`` (``0-0``: all), then new ones; keep-alives in between;
        ``unauthorized`` (and the end) once ``alive`` says no."""
        recheck = _Recheck(alive, recheck_s, keepalive_s, clock)
        key = call_stream(self.stream, call_id)
        yield f"retry: {RETRY_MS}\n\n"
        last = last_id if valid_entry_id(last_id) else "0-0"
        try:
            frames, seen = self._frames(await self.redis.xrange(key, min=f"({last}" if last != "0-0" else "-"))
        except (RedisError, OSError):
            yield sse("status", {"redis": "unreachable"})
            return  # the browser reconnects after RETRY_MS
        for frame in frames:
            yield frame
        last = seen or last
        while True:
            if await recheck.ended():
                yield UNAUTHORIZED
                return
            try:
                reply = await self.redis.xread({key: last}, block=max(1, int(recheck.wait_s * 1000)), count=100)
            except (RedisError, OSError):
                yield sse("status", {"redis": "unreachable"})
                return
            if not reply:
                yield ": keep-alive\n\n"
                continue
            frames, seen = self._frames(reply[0][1])
            for frame in frames:
                yield frame
            last = seen or last
