"""Server-sent event streams for the live board and the live call view.

Both follow the :class:`~gateway.web.live.LiveHub` through a
:class:`~gateway.web.live.Subscription` taken *before* anything is replayed, so
no event can fall between the replay and the live part; events seen in both
are skipped by their per-call number. SSE ids are those numbers, so a browser
that reconnects (``Last-Event-ID``) is not sent what it already has.

A stream lives for hours, far past the request that authenticated it, so it
asks ``alive`` again every ``recheck_s`` (the session still logged in and not
revoked, the password unchanged, the token not revoked): when the answer is no,
it sends ``unauthorized`` and ends, and the browser's reconnect gets a 401.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from ..events import CALL_ENDED
from .live import OVERFLOW, RESET, BoardChange, BoardSubscription, LiveHub, Subscription, event_number

RETRY_MS = 2000  # how soon an EventSource reconnects after the stream ends


def sse(event: str, data: Any, id: str | None = None) -> str:
    """One SSE frame; the JSON has no newlines, so it is one data line."""
    head = f"event: {event}\n"
    if id is not None:
        head += f"id: {id}\n"
    return head + "data: " + json.dumps(data, separators=(",", ":")) + "\n\n"


def _status(hub: LiveHub) -> dict[str, Any]:
    return {"redis": "ok" if hub.redis_ok else "unreachable"}


Alive = Callable[[], Awaitable[bool]]
UNAUTHORIZED = sse("unauthorized", {"reason": "the login or token that opened this stream is no longer valid"})


class _Recheck:
    """When to ask ``alive`` again; how long a wait for the next item may last."""

    def __init__(self, alive: Alive | None, every_s: float, keepalive_s: float,
                 clock: Callable[[], float]) -> None:
        self.alive = alive
        self.every_s = every_s
        self.clock = clock
        self.wait_s = keepalive_s if alive is None else min(keepalive_s, every_s)
        self.due = clock() + every_s

    async def ended(self) -> bool:
        """True when the credential no longer holds (asked at most every ``every_s``)."""
        if self.alive is None or self.clock() < self.due:
            return False
        self.due = self.clock() + self.every_s
        return not await self.alive()


async def board_events(hub: LiveHub, sub: BoardSubscription, keepalive_s: float, *, alive: Alive | None = None,
                       recheck_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> AsyncIterator[str]:
    """``snapshot`` (all active calls), then ``call`` upserts, ``ended`` and ``status``;
    ``unauthorized`` (and the end) once ``alive`` says no."""
    recheck = _Recheck(alive, recheck_s, keepalive_s, clock)
    try:
        yield f"retry: {RETRY_MS}\n\n"
        yield sse("snapshot", {"calls": [c.to_json() for c in hub.active()], **_status(hub)})
        while True:
            item = await sub.get(recheck.wait_s)
            if await recheck.ended():
                yield UNAUTHORIZED
                return
            if item is None:
                yield ": keep-alive\n\n"
            elif item is OVERFLOW or item is RESET:
                yield sse("reset", {"reason": item["type"]})
                return  # the browser reconnects and gets a fresh snapshot
            elif isinstance(item, BoardChange):
                if item.kind == "snapshot":
                    yield sse("snapshot", {"calls": [c.to_json() for c in hub.active()], **_status(hub)})
                elif item.kind == "status":
                    yield sse("status", _status(hub))
                else:
                    yield sse(item.kind, item.to_json())
    finally:
        sub.close()


async def call_events(hub: LiveHub, sub: Subscription, call_id: str, last_seen: int,
                      keepalive_s: float, *, alive: Alive | None = None, recheck_s: float = 10.0,
                      clock: Callable[[], float] = time.monotonic) -> AsyncIterator[str]:
    """The call's events so far (from its own stream), then live ones; ``end`` after call.ended;
    ``unauthorized`` (and the end) once ``alive`` says no."""
    recheck = _Recheck(alive, recheck_s, keepalive_s, clock)
    try:
        yield f"retry: {RETRY_MS}\n\n"
        try:
            replayed = await hub.replay(call_id)
        except ConnectionError:
            replayed = []
            yield sse("status", {"redis": "unreachable"})
        for event in replayed:
            number = event_number(event)
            if not number or number > last_seen:
                last_seen = max(last_seen, number)
                yield sse("event", event, id=str(number))
            if event.get("type") == CALL_ENDED:  # also when already seen: a reconnect after the end
                yield sse("end", {"reason": event.get("reason")})
                return
        yield sse("live", {"replayed": len(replayed)})
        while True:
            item = await sub.get(recheck.wait_s)
            if await recheck.ended():
                yield UNAUTHORIZED
                return
            if item is None:
                yield ": keep-alive\n\n"
                continue
            if item is OVERFLOW or item is RESET:
                yield sse("reset", {"reason": item["type"]})
                return
            number = event_number(item)
            if number and number <= last_seen:
                continue
            last_seen = max(last_seen, number)
            yield sse("event", item, id=str(number))
            if item.get("type") == CALL_ENDED:
                yield sse("end", {"reason": item.get("reason")})
                return
    finally:
        sub.close()
