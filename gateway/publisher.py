"""Publishes events to Redis Streams without ever stalling a call.

Calls hand events to :meth:`Publisher.publish`, which only appends to an
in-memory queue. One writer task drains the queue in order, writing each batch to
the global stream and to each call's own stream in one MULTI/EXEC, with
approximate MAXLEN trimming. When Redis is down the writer keeps the queue and
retries with backoff, so nothing accepted is lost while the process lives; a
retry after a lost acknowledgement can duplicate an entry, which consumers absorb
through the stable ``event_id``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .events import CALL_ENDED, TURN_PARTIAL, Event

log = logging.getLogger(__name__)


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
        on_published: Callable[[Event, float], None] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.events_stream = events_stream
        self._call_stream = call_stream
        self.maxlen = maxlen
        self.call_maxlen = call_maxlen
        self.call_ttl_s = call_ttl_s
        self.buffer_limit = buffer_limit
        self.batch_size = batch_size
        self.on_published = on_published
        self._queue: collections.deque[Event] = collections.deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._client: aioredis.Redis | None = None
        self.published = 0
        self.dropped_partials = 0
        self.failures = 0
        self.connected = False

    # -- producer side (call path): never blocks, never raises on Redis trouble
    def publish(self, event: Event) -> None:
        if event.type == TURN_PARTIAL and len(self._queue) >= self.buffer_limit:
            # partials are superseded by their final anyway; finals are never dropped
            self.dropped_partials += 1
            return
        self._queue.append(event)
        self._idle.clear()
        self._wakeup.set()

    @property
    def backlog(self) -> int:
        return len(self._queue)

    # -- lifecycle
    async def start(self) -> None:
        self._client = aioredis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)
        self._task = asyncio.create_task(self._run(), name="earshot-publisher")

    async def ping(self) -> bool:
        if self._client is None:
            return False
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far reached Redis; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self, timeout: float = 10.0) -> None:
        if not await self.flush(timeout):
            log.error("closing with %d events not yet published to Redis", len(self._queue))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            await self._client.aclose()

    # -- writer
    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._queue[i] for i in range(min(self.batch_size, len(self._queue)))]
            try:
                published_at = await self._write(batch)
            except (RedisError, OSError) as exc:
                self.failures += 1
                if self.connected:
                    log.warning("Redis write failed (%s); keeping %d events and retrying", exc, len(self._queue))
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not self.connected:
                log.info("Redis reachable at %s", self.redis_url)
            self.connected = True
            backoff = 0.1
            for _ in batch:
                self._queue.popleft()
            self.published += len(batch)
            if self.on_published is not None:
                for event in batch:
                    latency = (
                        published_at - event.speech_end_monotonic
                        if event.speech_end_monotonic is not None
                        else float("nan")
                    )
                    try:
                        self.on_published(event, latency)
                    except Exception:  # a metrics hook must not break publishing
                        log.exception("on_published hook failed")

    async def _write(self, batch: list[Event]) -> float:
        assert self._client is not None
        published_at = time.monotonic()
        pipe = self._client.pipeline(transaction=True)
        for event in batch:
            fields = event.to_fields(published_at)
            pipe.xadd(self.events_stream, fields, maxlen=self.maxlen, approximate=True)
            stream = self._call_stream(event.call.call_id)
            pipe.xadd(stream, fields, maxlen=self.call_maxlen, approximate=True)
            if event.type == CALL_ENDED:
                pipe.expire(stream, self.call_ttl_s)
        await pipe.execute()
        return published_at
