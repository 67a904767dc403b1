"""gateway.tasks.stop_tasks: a task that swallows its cancellation still stops, and a shutdown is bounded.

The regression behind it: redis-py's asyncio client can complete a command and return
normally to a task that was cancelled meanwhile, so a heartbeat's ``while True`` loop
went on after ``cancel()`` and ``await task`` never returned (a unit test run hung in a
gateway's close). The last test reproduces that against the real Redis.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
import redis.asyncio as aioredis

from gateway.presence import Heartbeat
from gateway.tasks import stop_tasks
from tests.conftest import REDIS_URL


async def test_a_task_that_swallows_one_cancel_is_cancelled_again() -> None:
    rounds = []

    async def stubborn() -> None:
        while True:  # what a loop around a redis-py call does when the call swallowed the cancel
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                rounds.append("swallowed")
                if len(rounds) < 3:
                    continue
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    stuck = await stop_tasks([task], timeout=2.0)
    assert stuck == set() and task.cancelled()
    assert rounds == ["swallowed"] * 3


async def test_a_task_that_never_stops_is_reported_after_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    released = asyncio.Event()

    async def immortal() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass

    task = asyncio.create_task(immortal(), name="immortal")
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    stuck = await stop_tasks([task], timeout=0.3)
    assert stuck == {task}
    assert 0.3 <= loop.time() - began < 2.0
    assert "immortal did not stop" in caplog.text
    assert not task.done()
    released.set()  # the test's own cleanup: let it end
    task.cancel()
    await asyncio.wait([task], timeout=2.0)
    assert task.done()


async def test_failed_and_finished_tasks_are_consumed_not_raised() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    async def done() -> int:
        return 1

    failing, finished = asyncio.create_task(fails()), asyncio.create_task(done())
    await asyncio.sleep(0.01)
    assert await stop_tasks([failing, finished]) == set()
    assert await stop_tasks([]) == set()


async def test_heartbeat_close_always_ends_against_the_real_redis() -> None:
    """Close a heartbeat beating back to back at random points, many times: each close ends
    (before the fix about one in fifty hung forever here)."""
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
    prefix = f"earshot-test-hb-{uuid.uuid4().hex[:8]}"
    rng = random.Random(7)
    try:
        for i in range(150):
            beat = Heartbeat(client, f"{prefix}:gateway:{i}", 0.0005, lambda: {"calls": 0}, registry=f"{prefix}:gateways")
            await beat.start()
            await asyncio.sleep(rng.uniform(0.0, 0.005))
            closing = asyncio.ensure_future(beat.close())
            done, _ = await asyncio.wait({closing}, timeout=5.0)  # not wait_for: it would hang with the task
            assert done, f"Heartbeat.close() did not end (round {i})"
            assert beat._task is None
        assert await client.exists(f"{prefix}:gateway:149") == 0  # closed cleanly: its key deleted
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
