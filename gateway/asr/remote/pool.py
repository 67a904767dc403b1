"""The gateway's side of the ASR pool (``asr_backend: pool``): jobs out on Redis Streams,
results back on this instance's own reply stream.

Delivery, end to end:

- A request becomes one entry on ``<prefix>:asr:jobs:final`` or
  ``...:partial`` (:mod:`.wire`), read by the workers' consumer group.
- Its result comes back on ``<prefix>:asr:replies:<instance>``, read by one
  task of this process; the result for a request id resolves its waiter
  once. A second result for the same id (a job done twice after a worker
  was presumed dead and its job reclaimed) is counted and ignored, so a turn
  gets exactly one ``turn.final``.
- No result by the request's deadline: :class:`AsrTimeout`, and the job's
  cancel key is set so that a worker that has not started it skips it. The
  call goes on; its later turns are not held up.
- A partial superseded here (a newer partial or the final for the same key
  before its result came) fails at once with :class:`Superseded` and is
  cancelled on the workers too. Cancelling the awaiting task (a speculative
  final whose speaker went on) cancels the job the same way.
- Fairness: at most ``session_limit`` jobs of one session (a call) of each kind
  are in Redis at a time; the session's further jobs wait here, in order.
  The job streams are first in, first out, so without this one call flooding
  turns would put its whole backlog ahead of every other call's finals.
- Redis down: sending is retried until the deadline. When Redis comes back
  as a new server (a restart without persistence, seen as a new ``run_id``)
  every job still waiting for its result is sent again: the old entries
  are gone with the old server.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..interface import (
    AsrTimeout,
    Superseded,
    TranscriberClosed,
    TranscriptionError,
    TranscriptionRequest,
    TranscriptionResult,
)
from ...config import mask_url
from .wire import PoolNames, WireError, decode_reply, encode_job
from ...tasks import stop_tasks

log = logging.getLogger(__name__)

__all__ = ["PoolTranscriber"]

REPLY_READ_BLOCK_MS = 1000
CANCEL_TTL_MS = 120_000


class RemoteError(TranscriptionError):
    """The worker answered with an error (``code`` as it sent it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message or code)
        self.code = code


@dataclass(eq=False)
class _Waiting:
    request: TranscriptionRequest
    future: asyncio.Future[TranscriptionResult]
    sent: bool = False
    sent_at: float = 0.0
    resent: int = 0


@dataclass
class PoolStats:
    sent: Counter[str] = field(default_factory=Counter)  # kind -> jobs sent
    results: int = 0
    duplicates: int = 0  # second results for a request already answered (a job done twice)
    late: int = 0  # results for a request that timed out or was withdrawn meanwhile
    timeouts: Counter[str] = field(default_factory=Counter)  # kind -> deadlines missed
    superseded: int = 0
    cancelled: int = 0
    remote_errors: int = 0
    resent: int = 0
    send_failures: int = 0
    bad_replies: int = 0


class PoolTranscriber:
    """Transcriber whose work is done by ``earshot worker`` processes through Redis."""

    def __init__(
        self,
        redis_url: str,
        *,
        names: PoolNames,
        instance: str,
        default_timeout_s: float = 15.0,
        stream_maxlen: int = 100_000,
        session_limit: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(session_limit, bool) or not isinstance(session_limit, int) or session_limit < 1:
            raise ValueError(f"session_limit must be an integer of at least 1, got {session_limit!r}")
        self.name = "pool"
        self.redis_url = redis_url
        self.names = names
        self.instance = instance
        self.reply_stream = names.replies(instance)
        self.default_timeout_s = default_timeout_s
        self.stream_maxlen = stream_maxlen
        self.session_limit = session_limit
        self._wall = clock
        # (session, kind) -> jobs of it in Redis now, and the ones waiting for their turn here
        self._sending: dict[tuple[str, str], int] = {}
        self._turns: dict[tuple[str, str], collections.deque[asyncio.Future[None]]] = {}
        self._client: aioredis.Redis | None = None
        self._waiting: dict[str, _Waiting] = {}
        self._partial_of: dict[str, str] = {}  # key -> request id of its partial still waiting
        self._answered: collections.OrderedDict[str, None] = collections.OrderedDict()  # recent ids, bounded
        self._unsent: list[_Waiting] = []  # to send again: their entries were lost with a restarted Redis
        self._reader: asyncio.Task[None] | None = None
        self._run_id: str | None = None
        self._closed = False
        self.connected = False
        self.stats = PoolStats()

    # -- life cycle
    async def start(self) -> None:
        self._client = aioredis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)
        self._reader = asyncio.create_task(self._read_replies(), name="earshot-asr-replies")

    async def close(self) -> None:
        """Refuse new requests; waiting partials fail, waiting finals keep their deadlines."""
        self._closed = True
        for waiting in list(self._waiting.values()):
            if waiting.request.kind == "partial" and not waiting.future.done():
                waiting.future.set_exception(TranscriberClosed("pool transcriber closed"))
        finals = [w for w in self._waiting.values() if not w.future.done()]
        if finals:
            last = max(w.request.deadline or 0.0 for w in finals)
            await asyncio.wait([w.future for w in finals], timeout=max(0.0, last - self._wall()) + 0.1)
        if self._reader is not None:
            await stop_tasks([self._reader])  # bounded, re-cancelled: gateway/tasks.py
        if self._client is not None:
            try:
                await self._client.delete(self.reply_stream)
            except (RedisError, OSError):
                pass
            await self._client.aclose()

    # -- the Transcriber interface
    @property
    def queued(self) -> int:
        """Requests sent (or being sent) and not answered yet: this gateway's ASR backlog."""
        return len(self._waiting)

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        if self._closed:
            raise TranscriberClosed("pool transcriber closed")
        if not isinstance(request, TranscriptionRequest):
            raise TypeError(f"expected a TranscriptionRequest, got {type(request).__name__}")
        if request.deadline is None:
            request = replace(request, deadline=self._wall() + self.default_timeout_s)
        assert request.deadline is not None
        if request.key:
            self._supersede(request.key)
        waiting = _Waiting(request, asyncio.get_running_loop().create_future())
        self._waiting[request.request_id] = waiting
        if request.key and request.kind == "partial":
            self._partial_of[request.key] = request.request_id
        try:
            left = request.deadline - self._wall()
            if left <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self._send_and_wait(waiting), left)
        except asyncio.TimeoutError:
            self.stats.timeouts[request.kind] += 1
            self._cancel_remote(request.request_id)
            raise AsrTimeout(f"no result for {request.kind} {request.request_id} from the pool by its deadline") from None
        except asyncio.CancelledError:
            if not waiting.future.done():
                self.stats.cancelled += 1
                self._cancel_remote(request.request_id)
            raise
        finally:
            self._waiting.pop(request.request_id, None)
            if self._partial_of.get(request.key) == request.request_id:
                del self._partial_of[request.key]

    def _supersede(self, key: str) -> None:
        older = self._partial_of.pop(key, None)
        waiting = self._waiting.get(older) if older else None
        if waiting is not None and not waiting.future.done():
            self.stats.superseded += 1
            waiting.future.set_exception(Superseded(f"partial for {key!r} replaced by a newer request"))
            self._cancel_remote(waiting.request.request_id)

    async def _send_and_wait(self, waiting: _Waiting) -> TranscriptionResult:
        group = (waiting.request.fairness_group, waiting.request.kind)
        held = False
        try:
            held = await self._take_turn(group, waiting)
            return await self._send_and_wait_turn(waiting)
        finally:
            if held:
                self._end_turn(group)

    async def _take_turn(self, group: tuple[str, str], waiting: _Waiting) -> bool:
        """Wait until fewer than ``session_limit`` jobs of this session and kind are in Redis;
        False if the request was answered (superseded) before its turn came."""
        if self._sending.get(group, 0) < self.session_limit and not self._turns.get(group):
            self._sending[group] = self._sending.get(group, 0) + 1
            return True
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._turns.setdefault(group, collections.deque())
        queue.append(turn)
        try:
            await asyncio.wait((turn, waiting.future), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._end_turn(group)  # handed the slot just as the caller gave up: pass it on
            else:
                self._leave_line(group, queue, turn)
            raise
        if turn.done():
            return True
        self._leave_line(group, queue, turn)  # answered (superseded) before its turn came
        return False

    def _leave_line(self, group: tuple[str, str], queue: collections.deque[asyncio.Future[None]],
                    turn: asyncio.Future[None]) -> None:
        turn.cancel()
        try:
            queue.remove(turn)
        except ValueError:
            pass
        if not queue and self._turns.get(group) is queue:
            del self._turns[group]

    def _end_turn(self, group: tuple[str, str]) -> None:
        queue = self._turns.get(group)
        while queue:
            turn = queue.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes on: the count stays
                if not queue:
                    del self._turns[group]
                return
        self._turns.pop(group, None)
        left = self._sending.get(group, 0) - 1
        if left > 0:
            self._sending[group] = left
        else:
            self._sending.pop(group, None)

    async def _send_and_wait_turn(self, waiting: _Waiting) -> TranscriptionResult:
        backoff = 0.05
        while not waiting.sent:
            if waiting.future.done():
                break  # superseded or closed before it could be sent
            try:
                await self._send(waiting)
            except (RedisError, OSError) as exc:
                self.stats.send_failures += 1
                if self.connected:
                    log.warning("ASR job not sent (%s); retrying until its deadline", exc)
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        return await waiting.future

    async def _send(self, waiting: _Waiting) -> None:
        assert self._client is not None
        request = waiting.request
        fields = encode_job(request, self.reply_stream, self._wall())
        await self._client.xadd(self.names.jobs(request.kind), fields,  # type: ignore[arg-type]
                                maxlen=self.stream_maxlen, approximate=True)
        waiting.sent, waiting.sent_at = True, self._wall()
        self.stats.sent[request.kind] += 1

    def _cancel_remote(self, request_id: str) -> None:
        """Best effort: a worker that reads the job after this skips it."""
        if self._client is None:
            return
        task = asyncio.ensure_future(self._set_cancel(request_id))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _set_cancel(self, request_id: str) -> None:
        assert self._client is not None
        try:
            await self._client.set(self.names.cancel(request_id), b"1", px=CANCEL_TTL_MS)
        except (RedisError, OSError):
            pass

    # -- replies
    async def _read_replies(self) -> None:
        last_id = "0-0"
        backoff = 0.1
        while True:
            try:
                await self._check_server()
                response = await self._client.xread(  # type: ignore[union-attr]
                    {self.reply_stream: last_id}, count=256, block=REPLY_READ_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("ASR reply stream unreadable (%s); retrying", exc)
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            if not self.connected:
                log.info("ASR pool reachable through Redis at %s", mask_url(self.redis_url))
            self.connected = True
            ids = []
            for _stream, entries in response or []:
                for entry_id, fields in entries:
                    last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    ids.append(entry_id)
                    self._deliver(fields)
            if ids:
                try:
                    await self._client.xdel(self.reply_stream, *ids)  # type: ignore[union-attr]
                except (RedisError, OSError):
                    pass

    async def _check_server(self) -> None:
        """Send again what is waiting when Redis came back as a new server (its run_id
        changed: a restart without persistence lost the job entries)."""
        if not self.connected or self._run_id is None:
            info = await self._client.info("server")  # type: ignore[union-attr]
            run_id = str(info.get("run_id", ""))
            if self._run_id is not None and run_id != self._run_id:
                lost = [w for w in self._waiting.values() if w.sent and not w.future.done()]
                log.warning("Redis restarted (new run_id); sending %d waiting ASR jobs again", len(lost))
                for w in lost:
                    w.sent = False
                    w.resent += 1
                    self.stats.resent += 1
                self._unsent += lost
            self._run_id = run_id
        while self._unsent:
            w = self._unsent[0]
            if not w.future.done() and not w.sent:
                await self._send(w)  # a failure leaves it first in line for the next round
            self._unsent.pop(0)

    def _deliver(self, fields: dict[Any, Any]) -> None:
        try:
            reply = decode_reply(fields)
        except WireError as exc:
            self.stats.bad_replies += 1
            log.error("unreadable ASR reply: %s", exc)
            return
        waiting = self._waiting.get(reply.request_id)
        if waiting is None or waiting.future.done():
            if reply.request_id in self._answered:
                self.stats.duplicates += 1
            else:
                self.stats.late += 1
            return
        self.stats.results += 1
        self._answered[reply.request_id] = None
        if len(self._answered) > 10_000:
            self._answered.popitem(last=False)
        if reply.result is not None:
            waiting.future.set_result(reply.result)
        else:
            self.stats.remote_errors += 1
            waiting.future.set_exception(RemoteError(reply.error, reply.message))
