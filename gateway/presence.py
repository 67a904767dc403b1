"""Heartbeats in Redis: which gateway instances and ASR workers are alive, and what they carry.

Each process writes one key, ``<prefix>:gateway:<instance>`` or
``<prefix>:asr:worker:<id>``, holding a JSON description, every
``interval_s`` with a time-to-live of three intervals: a process that dies
disappears by itself within three intervals, and one that stops cleanly
deletes its key. ``earshot status`` and the gateway's health read them back.
A gateway's heartbeat also goes into a registry hash with no TTL
(``<prefix>:gateways``, :mod:`gateway.instances`): a key that expired says
nothing, the registry remembers that an instance existed and when it was last
seen, so one that died can be reported lost and its calls ended.
Nothing here is a cluster protocol: the keys only describe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from .tasks import stop_tasks

log = logging.getLogger(__name__)

__all__ = ["Heartbeat", "default_instance_id", "read_presence"]


def default_instance_id() -> str:
    """<hostname>-<pid>-<4 hex>: readable, and new at every start (a reused pid gets a new id)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class Heartbeat:
    """Writes ``describe()`` as JSON under ``key`` every ``interval_s``, with a TTL of 3 intervals."""

    def __init__(self, client: Any, key: str, interval_s: float, describe: Callable[[], dict[str, Any]],
                 registry: str | None = None) -> None:
        """``registry``: a hash that also gets the body under the key's name, without a TTL."""
        self.client = client
        self.key = key
        self.registry = registry
        self.interval_s = interval_s
        self.describe = describe
        self._task: asyncio.Task[None] | None = None
        self.beats = 0

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._run(), name=f"heartbeat {self.key}")

    async def beat(self) -> bool:
        body = dict(self.describe())
        body["heartbeat"] = time.time()
        try:
            text = json.dumps(body, separators=(",", ":"))
            if self.registry is None:
                await self.client.set(self.key, text, px=max(1, int(self.interval_s * 3000)))
            else:
                pipe = self.client.pipeline(transaction=False)
                pipe.set(self.key, text, px=max(1, int(self.interval_s * 3000)))
                pipe.hset(self.registry, self.key, text)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.debug("heartbeat %s not written: %s", self.key, exc)
            return False
        self.beats += 1
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def close(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])  # redis-py may swallow one cancel (gateway/tasks.py)
            self._task = None
        try:
            await self.client.delete(self.key)
            if self.registry is not None:
                await self.client.hdel(self.registry, self.key)  # stopped cleanly: not lost
        except (RedisError, OSError):
            pass  # it expires by itself


async def read_presence(client: Any, pattern: str) -> list[dict[str, Any]]:
    """Every live heartbeat matching ``pattern``, parsed; unreadable ones are skipped."""
    keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
    if not keys:
        return []
    out = []
    for raw in await client.mget(keys):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(body, dict):
            out.append(body)
    return out
