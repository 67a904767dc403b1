"""``earshot worker``: a Whisper engine serving the pool's job streams from a Redis consumer group.

The worker is the embedded transcriber's scheduler and engine
(:class:`~gateway.asr.scheduler.AsrScheduler`,
:class:`~gateway.asr.runner.BatchRunner`,
:class:`~gateway.asr.whisper.engine.WhisperEngine`) with Redis on both
sides instead of a call:

- Reading. Finals first: the partials stream is read only for the room the
  finals left. A worker takes no more jobs than it can start soon
  (``prefetch``: one batch per runner thread beyond those running), so a
  backlog stays in Redis, where any worker can take it and KEDA can see it
  (the group's lag).
- Batching. The runner takes up to ``max_batch`` jobs that share a batch
  key, waiting at most ``batch_wait_s`` for company.
- Overload. The finals waiting in Redis (the group's lag, this worker's
  share of it) count towards the scheduler's ``overload_backlog``: past it,
  finals are decoded with the short window, as in the embedded backend.
- Dropping. A job whose cancel key is set (superseded, withdrawn or timed
  out at the gateway), or whose deadline has passed, is acknowledged and
  not decoded; so is a partial superseded by a newer one for its key.
- Replying. The result goes to the reply stream named in the job, then the
  job is acknowledged and deleted (XACK + XDEL, one round trip).
- Failover. A job delivered to a worker that died stays in the group's
  pending list; every worker periodically claims entries idle longer than
  ``claim_idle_s`` (XAUTOCLAIM) and does them. Live workers keep their own
  held jobs fresh (XCLAIM with JUSTID), so only a dead worker's jobs go
  idle. A job delivered ``max_deliveries`` times is answered with an error
  instead of being tried again (it may be what kills workers).
- Redis restarts: the group is re-created when Redis reports it missing.
- SIGTERM drains: no new jobs are read, the held ones are finished and
  answered, then the process exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from ..interface import AsrTimeout, Superseded, TranscriberClosed, TranscriptionResult
from ..runner import BatchRunner, Engine
from ..scheduler import AsrScheduler, Batch, SchedulerLimits
from ...tasks import stop_tasks
from ...config import mask_url
from .wire import Job, PoolNames, Reply, WireError, decode_job, encode_reply

log = logging.getLogger(__name__)

__all__ = ["AsrWorker", "WorkerConfig"]

REPLY_MAXLEN = 10_000
REPLY_TTL_S = 600
BACKLOG_POLL_S = 0.5
CLOSE_TIMEOUT_S = 5.0
HOUSEKEEPING_ROUNDS = 20  # consumers of gone workers are removed every 20 backlog polls
GONE_CONSUMER_IDLE_S = 60.0  # ... when they hold nothing, have no heartbeat and were this long silent


@dataclass(frozen=True)
class WorkerConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    names: PoolNames = PoolNames()
    worker_id: str = ""
    threads: int = 1
    limits: SchedulerLimits = SchedulerLimits(max_batch=8, batch_wait_s=0.01)
    prefetch: int = 0  # jobs held beyond those running; 0: max_batch per thread
    claim_idle_s: float = 5.0
    heartbeat_s: float = 2.0
    max_deliveries: int = 3
    block_ms: int = 500


@dataclass(eq=False)
class _Held:
    """A job this worker took from a stream and has not answered yet."""

    stream: str
    entry_id: bytes
    job: Job | None
    reply_to: str = ""  # where a bad job's error goes (a good job's is in the job)
    started: float = 0.0  # wall clock when its batch started
    batch: int = 0  # size of that batch


class AsrWorker:
    def __init__(self, config: WorkerConfig, engine: Engine, *, describe: Callable[[], dict[str, Any]] | None = None,
                 on_batch: Callable[[Batch, float], None] | None = None) -> None:
        self.config = config
        self.engine = engine
        self.names = config.names
        self.id = config.worker_id
        self.scheduler = AsrScheduler(engine.batch_key, config.limits, name=f"worker {self.id}")
        self._on_batch_hook = on_batch
        self.runner = BatchRunner(self.scheduler, engine, config.threads, name="asr-worker", on_batch=self._on_batch,
                                  on_start=self._on_start)
        self.prefetch = config.prefetch or config.limits.max_batch * config.threads
        self._describe = describe or (lambda: {})
        self._client: aioredis.Redis | None = None
        self._held: dict[bytes, _Held] = {}  # entry id -> held job
        self._done: asyncio.Queue[tuple[_Held, concurrent.futures.Future[TranscriptionResult] | Reply | None]] = \
            asyncio.Queue()
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.redis_up = False
        self.started_at = time.time()
        # counters (metrics and heartbeat)
        self.jobs: Counter[tuple[str, str]] = Counter()  # (kind, outcome) -> jobs
        self.reclaimed = 0
        self.backlog = 0  # finals waiting in Redis for any worker (the group's lag), last seen
        self.poison = 0
        self.replies_written = 0
        self.batch_sizes: Counter[int] = Counter()

    # -- life cycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = aioredis.Redis.from_url(self.config.redis_url, socket_timeout=10, socket_connect_timeout=2)
        try:
            await self._ensure_groups()
            self.redis_up = True
        except (RedisError, OSError) as exc:  # the read loop retries (and creates the groups)
            log.warning("Redis unreachable at start (%s); retrying", exc)
        self.runner.start()
        for coro, name in ((self._read_loop(), "read"), (self._write_loop(), "write"),
                           (self._claim_loop(), "claim"), (self._touch_loop(), "touch"),
                           (self._backlog_loop(), "backlog")):
            self._tasks.append(asyncio.create_task(coro, name=f"asr-worker-{name}"))

    async def drain(self, timeout: float | None = None) -> bool:
        """Take no new jobs; finish and answer the held ones. False if ``timeout`` ran out first."""
        self.draining = True
        self._room.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        # A read or claim already sent may still hand this worker jobs: let them return
        # first, so that every job delivered here is answered before the consumer goes.
        takers = [t for t in self._tasks if t.get_name() in ("asr-worker-read", "asr-worker-claim")]
        if takers:
            await asyncio.wait(takers, timeout=None if timeout is None else timeout)
        while self._held:
            if deadline is not None and time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        await self._leave_group()
        return True

    async def close(self) -> None:
        self.draining = True
        self.scheduler.close()
        # bounded, and re-cancelled: redis-py may swallow a cancel (gateway/tasks.py)
        await stop_tasks(self._tasks, timeout=CLOSE_TIMEOUT_S)
        self._tasks.clear()
        await asyncio.to_thread(self.runner.join, 30)
        if self._client is not None:
            await self._client.aclose()

    @property
    def client(self) -> aioredis.Redis:
        assert self._client is not None
        return self._client

    async def _ensure_groups(self) -> None:
        """Create the consumer group on both job streams, reading from the start (id 0):
        jobs written before the first worker came up are not skipped."""
        for stream in self.names.job_streams:
            try:
                await self.client.xgroup_create(stream, self.names.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- reading jobs
    async def _read_loop(self) -> None:
        final, partial = self.names.job_streams
        backoff = 0.1
        while not self.draining:
            # Waiting partials never keep a final out: finals have the whole prefetch to
            # themselves, partials what neither kind uses.
            final_room = self.prefetch - self.scheduler.queued_finals
            room = self.prefetch - self.scheduler.queued
            if final_room <= 0:
                self._room.clear()
                try:
                    await asyncio.wait_for(self._room.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                got = await self._read({final: ">"}, final_room, None)
                room -= got
                if room > 0 and not self.draining:
                    got += await self._read({partial: ">"}, room, None)
                if got == 0 and not self.draining:
                    if room > 0:
                        await self._read({final: ">", partial: ">"}, room, self.config.block_ms)
                    else:
                        await self._read({final: ">"}, final_room, self.config.block_ms)
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning("consumer group %s missing (Redis restarted?); creating it", self.names.group)
                    await self._safe(self._ensure_groups())
                else:
                    log.error("reading jobs failed: %s", exc)
                    await asyncio.sleep(backoff)
            except (RedisError, OSError) as exc:
                if self.redis_up:
                    log.warning("Redis unreachable (%s); retrying", exc)
                self.redis_up = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            if not self.redis_up:
                log.info("serving the ASR pool from %s", mask_url(self.config.redis_url))
            self.redis_up = True

    async def _read(self, streams: dict[str, str], count: int, block: int | None) -> int:
        response = await self.client.xreadgroup(self.names.group, self.id, streams, count=count, block=block)
        entries = [(self._name(stream), entry_id, fields) for stream, items in response or [] for entry_id, fields
                   in items]
        await self._accept(entries, reclaimed=False)
        return len(entries)

    async def _accept(self, entries: list[tuple[str, bytes, dict[Any, Any]]], *, reclaimed: bool) -> None:
        """Jobs just read or claimed: drop the ones nobody wants any more, queue the rest."""
        if not entries:
            return
        held: list[_Held] = []
        for stream, entry_id, fields in entries:
            if entry_id in self._held:
                continue  # already ours (claimed back after a slow round)
            if not fields:  # deleted while pending (XAUTOCLAIM before Redis 7 returns these)
                await self._safe(self._ack(stream, [entry_id]))
                continue
            try:
                job = decode_job(fields)
            except WireError as exc:
                log.error("bad job %s on %s: %s", entry_id, stream, exc.reason)
                self.poison += 1
                self.jobs[("unknown", "bad-request")] += 1
                h = _Held(stream, entry_id, None, reply_to=exc.reply_to)
                self._held[entry_id] = h
                reply = Reply(exc.request_id, None, "bad-request", exc.reason, self.id) if exc.request_id else None
                self._done.put_nowait((h, reply))
                continue
            h = _Held(stream, entry_id, job)
            self._held[entry_id] = h
            held.append(h)
            if reclaimed:
                self.reclaimed += 1
        if not held:
            return
        cancelled = await self._safe(self.client.mget([self.names.cancel(h.job.request.request_id)  # type: ignore[union-attr]
                                                       for h in held]), default=None)
        now = time.time()
        for i, h in enumerate(held):
            assert h.job is not None
            request = h.job.request
            if cancelled is not None and cancelled[i] is not None:
                self._finish(h, "cancelled")
                continue
            if request.deadline is not None and request.deadline <= now:
                self._finish(h, "deadline")
                continue
            try:
                future = self.scheduler.submit(request, tag=h)
            except TranscriberClosed:
                self._finish(h, "closed")
                continue
            future.add_done_callback(lambda f, h=h: self._from_thread(h, f))

    def _from_thread(self, held: _Held, future: concurrent.futures.Future[TranscriptionResult]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._done.put_nowait, (held, future))
            self._loop.call_soon_threadsafe(self._room.set)
        except RuntimeError:
            pass  # the loop is closed: the job stays pending and is reclaimed

    def _finish(self, held: _Held, outcome: str) -> None:
        """A job that gets no reply (nobody waits for it): acknowledge it."""
        kind = held.job.request.kind if held.job is not None else "unknown"
        self.jobs[(kind, outcome)] += 1
        self._done.put_nowait((held, None))

    # -- writing replies
    async def _write_loop(self) -> None:
        while True:
            items = [await self._done.get()]
            while not self._done.empty() and len(items) < 256:
                items.append(self._done.get_nowait())
            await self._write(items)

    async def _write(self, items: list[tuple[_Held, Any]]) -> None:
        backoff = 0.1
        while True:
            pipe = self.client.pipeline(transaction=False)
            replies = 0
            for held, outcome in items:
                reply = self._reply_for(held, outcome)
                if reply is not None:
                    target = held.job.reply_to if held.job is not None else held.reply_to
                    if target:
                        pipe.xadd(target, encode_reply(reply), maxlen=REPLY_MAXLEN, approximate=True)  # type: ignore[arg-type]
                        pipe.expire(target, REPLY_TTL_S)
                        replies += 1
                pipe.xack(held.stream, self.names.group, held.entry_id)
                pipe.xdel(held.stream, held.entry_id)
            try:
                await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("replies not written (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self.replies_written += replies
            for held, _ in items:
                self._held.pop(held.entry_id, None)
            return

    def _reply_for(self, held: _Held, outcome: Any) -> Reply | None:
        """The reply a finished job gets, counting its outcome; None: no reply is wanted."""
        if isinstance(outcome, Reply) or outcome is None:
            return outcome
        job = held.job
        assert job is not None
        request = job.request
        future: concurrent.futures.Future[TranscriptionResult] = outcome
        if future.cancelled():
            self.jobs[(request.kind, "cancelled")] += 1
            return None
        error = future.exception()
        if isinstance(error, Superseded):
            self.jobs[(request.kind, "superseded")] += 1
            return None
        if isinstance(error, AsrTimeout):
            self.jobs[(request.kind, "deadline")] += 1
            return None
        if isinstance(error, TranscriberClosed):
            self.jobs[(request.kind, "closed")] += 1
            return None  # not acknowledged work: but close only comes after a drain
        queued = max(0.0, held.started - job.sent_at) if held.started else 0.0
        if error is not None:
            self.jobs[(request.kind, "failed")] += 1
            return Reply(request.request_id, None, getattr(error, "code", "asr-failed"), repr(error), self.id, queued,
                         held.batch)
        self.jobs[(request.kind, "done")] += 1
        return Reply(request.request_id, future.result(), worker=self.id, queued_s=queued, batch=held.batch)

    def _on_start(self, batch: Batch) -> None:
        """Runner thread, before decoding: what the replies report about their batch."""
        now = time.time()
        for job in batch.jobs:
            held = job.tag
            if isinstance(held, _Held):
                held.started, held.batch = now, len(batch.jobs)

    def _on_batch(self, batch: Batch, seconds: float) -> None:
        self.batch_sizes[len(batch.jobs)] += 1
        if self._on_batch_hook is not None:
            self._on_batch_hook(batch, seconds)

    # -- failover
    async def _claim_loop(self) -> None:
        """Take over jobs held too long by a worker that stopped answering."""
        interval = max(0.2, self.config.claim_idle_s / 2)
        idle_ms = int(self.config.claim_idle_s * 1000)
        while not self.draining:
            await asyncio.sleep(interval)
            for stream in self.names.job_streams:
                room = self.prefetch - self.scheduler.queued
                if room <= 0 or self.draining:
                    break
                try:
                    result = await self.client.xautoclaim(stream, self.names.group, self.id, idle_ms,
                                                          start_id="0-0", count=room)
                except (RedisError, OSError) as exc:
                    log.debug("XAUTOCLAIM on %s failed: %s", stream, exc)
                    continue
                claimed = result[1] if len(result) > 1 else []
                fresh = [(entry_id, fields) for entry_id, fields in claimed if entry_id not in self._held]
                if not fresh:
                    continue
                accept = []
                for entry_id, fields in fresh:
                    deliveries = await self._deliveries(stream, entry_id)
                    if deliveries > self.config.max_deliveries:
                        await self._give_up(stream, entry_id, fields, deliveries)
                        continue
                    accept.append((stream, entry_id, fields))
                log.info("reclaimed %d job(s) from %s held by a silent worker", len(accept), stream)
                await self._accept(accept, reclaimed=True)

    async def _deliveries(self, stream: str, entry_id: bytes) -> int:
        try:
            rows = await self.client.xpending_range(stream, self.names.group, min=entry_id, max=entry_id, count=1)
        except (RedisError, OSError):
            return 0
        return int(rows[0]["times_delivered"]) if rows else 0

    async def _give_up(self, stream: str, entry_id: bytes, fields: dict[Any, Any], deliveries: int) -> None:
        """A job delivered too often: answer it with an error instead of risking another worker."""
        self.poison += 1
        log.error("job %s on %s delivered %d times; answering it with an error", entry_id, stream, deliveries)
        held = _Held(stream, entry_id, None)
        self._held[entry_id] = held
        try:
            job = decode_job(fields)
        except WireError:
            self._done.put_nowait((held, None))
            return
        held.job = job
        self.jobs[(job.request.kind, "poison")] += 1
        self._done.put_nowait((held, Reply(job.request.request_id, None, "asr-failed",
                                           f"job delivered {deliveries} times without an answer", self.id)))

    async def _touch_loop(self) -> None:
        """Reset the idle time of the jobs this worker holds, so that live work is not reclaimed."""
        interval = max(0.1, self.config.claim_idle_s / 3)
        while True:
            await asyncio.sleep(interval)
            by_stream: dict[str, list[bytes]] = {}
            for held in list(self._held.values()):
                by_stream.setdefault(held.stream, []).append(held.entry_id)
            for stream, ids in by_stream.items():
                await self._safe(self.client.xclaim(stream, self.names.group, self.id, 0, ids, justid=True))

    async def _backlog_loop(self) -> None:
        """Follow the finals waiting in Redis (the group's lag) for the overload switch: a
        worker holds only ``prefetch`` jobs, so its own queue never shows a backlog. Each
        worker counts its share: the lag over the live workers (by their heartbeats).
        Every few seconds it also removes the group's consumers of workers that are gone
        (no heartbeat) and hold nothing, so the group does not collect one per restart."""
        stream = self.names.jobs("final")
        live = 1
        rounds = 0
        while True:
            await asyncio.sleep(BACKLOG_POLL_S)
            try:
                if rounds % HOUSEKEEPING_ROUNDS == 0:
                    live = await self._forget_gone_consumers()
                rounds += 1
                groups = await self.client.xinfo_groups(stream)
            except (RedisError, OSError):
                continue
            for group in groups:
                if self._name(group.get("name")) != self.names.group:
                    continue
                lag = group.get("lag")
                self.backlog = int(lag) if isinstance(lag, int) else 0
                self.scheduler.backlog_elsewhere = -(-self.backlog // max(1, live))

    async def _forget_gone_consumers(self) -> int:
        """Delete consumers with no pending jobs, no heartbeat and no read for a minute (so not
        a live worker whose heartbeat lapsed); returns the number of live workers. A gone
        worker's pending jobs are reclaimed first, which empties its list."""
        from ...presence import read_presence

        alive = {str(w.get("id")) for w in await read_presence(self.client, self.names.workers_pattern)}
        alive.add(self.id)
        for stream in self.names.job_streams:
            try:
                consumers = await self.client.xinfo_consumers(stream, self.names.group)
            except ResponseError:
                continue
            quiet_ms = GONE_CONSUMER_IDLE_S * 1000
            for consumer in consumers:
                name = self._name(consumer.get("name"))
                # idle: since its last read attempt; a live worker reads every block_ms
                if name not in alive and int(consumer.get("pending", 0)) == 0 \
                        and int(consumer.get("idle", 0)) > quiet_ms:
                    await self.client.xgroup_delconsumer(stream, self.names.group, name)
        return len(alive)

    async def _leave_group(self) -> None:
        """After a drain: this worker's consumer holds nothing, so it can go."""
        for stream in self.names.job_streams:
            try:
                await self.client.xgroup_delconsumer(stream, self.names.group, self.id)
            except (RedisError, OSError):
                pass

    # -- helpers
    async def _ack(self, stream: str, ids: list[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(stream, self.names.group, *ids)
        pipe.xdel(stream, *ids)
        await pipe.execute()

    async def _safe(self, awaitable: Any, default: Any = None) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            log.debug("Redis call failed: %s", exc)
            return default

    @staticmethod
    def _name(stream: Any) -> str:
        return stream.decode() if isinstance(stream, bytes) else str(stream)

    # -- state
    @property
    def held(self) -> int:
        return len(self._held)

    def describe(self) -> dict[str, Any]:
        done = sum(n for (kind, outcome), n in self.jobs.items() if outcome == "done")
        return {
            "id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "max_batch": self.config.limits.max_batch,
            "batch_wait_ms": round(self.config.limits.batch_wait_s * 1000, 1),
            "threads": self.config.threads,
            "jobs_done": done,
            "reclaimed": self.reclaimed,
            "held": len(self._held),
            "queued": self.scheduler.queued,
            "draining": self.draining,
            "started": self.started_at,
            **self._describe(),
        }
