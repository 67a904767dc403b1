"""Which waiting transcription requests run next, and which of them run together.

The scheduler knows nothing about the model: it holds requests in two lanes
(finals, then partials), hands them out in batches of requests an engine can
decode in one call (``batch_key`` says which ones), and enforces the rules a
live call needs from a shared recognizer:

- Finals before partials. A final is what gets published and stored; a
  partial is a preview that is worthless a second later.
- Superseding. A partial still waiting when a newer request for the same
  ``key`` arrives (a newer partial, or the turn's final) is dropped with
  :class:`Superseded` instead of transcribed.
- Deadlines. A request still waiting at its ``deadline`` is dropped with
  :class:`AsrTimeout` and counted; nothing runs for a caller that gave up.
- Fairness. Within a lane, requests are taken round-robin across fairness
  groups (a call), first in, first out within a group: one call's flood of
  turns gets one share, not the whole recognizer.
- Bounds. Each lane and each group holds a bounded number of requests. A
  call with ``max_group_finals`` waiting loses its oldest waiting final to a
  new one; a full finals lane sheds the oldest final of the call holding the
  most (a flooding call pays, not a quiet one). A final shed (or refused) fails
  with :class:`AsrOverloaded` (published with error ``asr-overload``, never
  dropped silently); a partial past its bounds is refused, which costs
  nothing but a preview.
- Overload. When more finals wait than ``overload_backlog`` (here, plus
  ``backlog_elsewhere``: a pool worker's share of the finals waiting in
  Redis), the batch is flagged: the engine then decodes finals the cheap way
  (short window), so latency stays bounded while the backlog lasts.

The embedded transcriber (threads in the gateway) and the pool worker (jobs
from Redis) both put requests in an :class:`AsrScheduler` and run what
:meth:`AsrScheduler.next_batch` returns with :class:`gateway.asr.runner.BatchRunner`.
Thread-safe: ``submit`` is called from the event loop, ``next_batch`` from
the runner's threads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

from .interface import (
    AsrOverloaded,
    AsrTimeout,
    Superseded,
    TranscriberClosed,
    TranscriptionRequest,
    TranscriptionResult,
)

__all__ = ["AsrScheduler", "Batch", "Job", "SchedulerLimits"]

LANES = ("final", "partial")

BatchKey = Callable[[TranscriptionRequest, bool], Hashable]


@dataclass(frozen=True)
class SchedulerLimits:
    """How big batches get, how long a batch waits for company, and the queue bounds."""

    max_batch: int = 2
    batch_wait_s: float = 0.0  # 0: never wait; an idle queue gives a batch of one
    overload_backlog: int = 8  # more finals than this waiting: overload batches; 0: never
    max_finals: int = 4096
    max_partials: int = 1024
    max_group_finals: int = 64
    max_group_partials: int = 8

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_finals", "max_partials", "max_group_finals", "max_group_partials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
        if isinstance(self.overload_backlog, bool) or not isinstance(self.overload_backlog, int) \
                or self.overload_backlog < 0:
            raise ValueError(f"overload_backlog must be an integer of at least 0 (0 = off), got {self.overload_backlog!r}")
        wait = self.batch_wait_s
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0.0 <= wait <= 10.0:
            raise ValueError(f"batch_wait_s must be between 0 and 10 seconds, got {wait!r}")


@dataclass(eq=False)
class Job:
    """One request in the scheduler, and the future its result goes to."""

    request: TranscriptionRequest
    future: concurrent.futures.Future[TranscriptionResult]
    enqueued: float  # the scheduler's clock
    tag: object = None  # the host's handle (the pool worker keeps its stream entry here)
    _keys: dict[bool, Hashable] = field(default_factory=dict, repr=False)

    @property
    def lane(self) -> str:
        return self.request.kind

    @property
    def group(self) -> str:
        return self.request.fairness_group


@dataclass
class Batch:
    """Jobs to decode in one engine call."""

    jobs: list[Job]
    overloaded: bool  # finals to decode the cheap way (see ``overload_backlog``)
    waited: float  # seconds the batch waited for company after its first job was taken

    @property
    def requests(self) -> list[TranscriptionRequest]:
        return [job.request for job in self.jobs]


class AsrScheduler:
    def __init__(
        self,
        batch_key: BatchKey,
        limits: SchedulerLimits | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        name: str = "asr",
    ) -> None:
        """``wall_clock`` judges deadlines (injectable for tests); waiting is always in real
        time (``time.monotonic``), since threads really block."""
        self.batch_key = batch_key
        self.limits = limits or SchedulerLimits()
        self.name = name
        self._clock = time.monotonic
        self._wall = wall_clock
        self._cond = threading.Condition(threading.RLock())
        # lane -> fairness group -> that group's jobs, oldest first; groups in round-robin order
        self._lanes: dict[str, collections.OrderedDict[str, collections.deque[Job]]] = {
            lane: collections.OrderedDict() for lane in LANES}
        self._counts = {lane: 0 for lane in LANES}
        self._queued_partials: dict[str, Job] = {}  # key -> its waiting partial
        self._by_id: dict[str, Job] = {}
        self._closed = False
        self._paused = False
        self.running = 0  # batches handed out and not yet finished
        # Finals waiting outside this scheduler that count towards overload: a pool worker
        # holds only a few jobs and the backlog waits in Redis (it sets this from the lag).
        self.backlog_elsewhere = 0
        # counters (read without the lock: ints written under it)
        self.submitted = {lane: 0 for lane in LANES}
        self.dropped: dict[str, int] = collections.Counter()  # reason -> requests
        self.batches = 0  # batches handed out, a lone request included
        self.batched = 0  # requests that shared their batch with another
        self.overloaded = 0  # finals handed out in overload batches

    # -- producer side
    def submit(self, request: TranscriptionRequest, tag: object = None) -> concurrent.futures.Future[TranscriptionResult]:
        """Queue a request; its future gets the result, or the reason it got none.

        Cancelling the future withdraws a request that has not started.
        """
        if not isinstance(request, TranscriptionRequest):
            raise TypeError(f"expected a TranscriptionRequest, got {type(request).__name__}")
        future: concurrent.futures.Future[TranscriptionResult] = concurrent.futures.Future()
        lane = request.kind
        limits = self.limits
        with self._cond:
            if self._closed:
                raise TranscriberClosed(f"{self.name} is closed")
            if request.key:
                older = self._queued_partials.get(request.key)
                if older is not None:
                    self._remove(older)
                    self._fail(older, Superseded(f"partial for {request.key!r} replaced by a newer request"),
                               "superseded")
            if request.deadline is not None and request.deadline <= self._wall():
                self.dropped["deadline"] += 1
                future.set_exception(AsrTimeout(f"{request.kind} {request.request_id} arrived past its deadline"))
                return future
            groups = self._lanes[lane]
            queue = groups.get(request.fairness_group)
            if lane == "final":
                self._make_room_for_final(request.fairness_group)
                queue = groups.get(request.fairness_group)
            lane_limit, group_limit = ((limits.max_finals, limits.max_group_finals) if lane == "final"
                                       else (limits.max_partials, limits.max_group_partials))
            if self._counts[lane] >= lane_limit or (queue is not None and len(queue) >= group_limit):
                self.dropped["queue-full"] += 1
                whose = "the queue" if self._counts[lane] >= lane_limit else f"session {request.fairness_group!r}"
                future.set_exception(AsrOverloaded(f"{self.name}: {whose} already holds the most {lane}s allowed"))
                return future
            job = Job(request, future, self._clock(), tag)
            if queue is None:
                queue = groups[request.fairness_group] = collections.deque()
            queue.append(job)
            self._counts[lane] += 1
            self.submitted[lane] += 1
            self._by_id[request.request_id] = job
            if request.key and lane == "partial":
                self._queued_partials[request.key] = job
            self._cond.notify()
        future.add_done_callback(lambda f, job=job: self._withdraw(job) if f.cancelled() else None)
        return future

    def _make_room_for_final(self, group: str) -> None:
        """Bounds on finals, fairly (lock held): a call at ``max_group_finals`` loses its own
        oldest waiting final; a full lane loses the oldest final of the call holding the most
        (the newcomer's own call when it is one of those). The final shed fails with
        :class:`AsrOverloaded` (the turn is published with error ``asr-overload``): the newest
        speech is what a live call needs, and the oldest is the nearest to its deadline anyway."""
        limits = self.limits
        groups = self._lanes["final"]
        mine = groups.get(group)
        if mine is not None and len(mine) >= limits.max_group_finals:
            self._shed(mine[0], f"session {group!r} already holds the most finals allowed "
                                f"({limits.max_group_finals}); its oldest waiting final is dropped")
            return
        if self._counts["final"] < limits.max_finals or not groups:
            return
        largest = max(groups, key=lambda name: len(groups[name]))
        victim = group if mine is not None and len(mine) >= len(groups[largest]) else largest
        self._shed(groups[victim][0], f"the queue holds the most finals allowed ({limits.max_finals}); "
                                      f"the oldest of session {victim!r}, which holds the most, is dropped")

    def _shed(self, job: Job, reason: str) -> None:
        self._remove(job)
        self.dropped["shed"] += 1
        if job.future.set_running_or_notify_cancel():
            job.future.set_exception(AsrOverloaded(f"{self.name}: {reason}"))

    def cancel(self, request_id: str) -> bool:
        """Withdraw a request that has not started; True if it was waiting."""
        with self._cond:
            job = self._by_id.get(request_id)
            if job is None:
                return False
            self._remove(job)
            self.dropped["cancelled"] += 1
        job.future.cancel()
        return True

    def _withdraw(self, job: Job) -> None:
        """The caller cancelled the job's future (a speculative final whose turn went on)."""
        with self._cond:
            if self._by_id.get(job.request.request_id) is job:
                self._remove(job)
                self.dropped["cancelled"] += 1

    # -- consumer side
    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """The next batch to run; blocks until there is one.

        None once the scheduler is closed and holds no finals, or after
        ``timeout`` seconds with nothing to run. The caller runs the batch,
        sets every job's future, then calls :meth:`finished`.
        """
        limits = self.limits
        give_up = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if not self._paused:
                    backlog = self._counts["final"] + self.backlog_elsewhere
                    first = self._take_first()
                    if first is not None:
                        break
                    if self._closed:
                        return None
                wait = None if give_up is None else give_up - self._clock()
                if wait is not None and wait <= 0:
                    return None
                self._cond.wait(wait)
            overloaded = first.lane == "final" and 0 < limits.overload_backlog < backlog
            key = self._key(first, overloaded)
            jobs = [first]
            jobs += self._take_compatible(first.lane, key, overloaded, limits.max_batch - 1)
            started = self._clock()
            if len(jobs) < limits.max_batch and limits.batch_wait_s > 0 and not self._closed:
                until = started + limits.batch_wait_s
                while len(jobs) < limits.max_batch and not self._closed:
                    left = until - self._clock()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    jobs += self._take_compatible(first.lane, key, overloaded, limits.max_batch - len(jobs))
            self.running += 1
            self.batches += 1
            if len(jobs) > 1:
                self.batched += len(jobs)
            if overloaded:
                self.overloaded += len(jobs)
            return Batch(jobs, overloaded, self._clock() - started)

    def finished(self, batch: Batch) -> None:
        """The batch's results are set (see :attr:`idle`)."""
        with self._cond:
            self.running -= 1
            self._cond.notify_all()

    def _take_first(self) -> Job | None:
        for lane in LANES:
            groups = self._lanes[lane]
            while groups:
                group = next(iter(groups))
                job = self._pop_head(lane, group)
                if job is not None:
                    return job
        return None

    def _take_compatible(self, lane: str, key: Hashable, overloaded: bool, room: int) -> list[Job]:
        """Up to ``room`` jobs from the heads of the lane's groups, in round-robin order,
        that share ``key``. Only heads: FIFO order within a group holds."""
        taken: list[Job] = []
        groups = self._lanes[lane]
        progress = True
        while room > 0 and progress:
            progress = False
            for group in list(groups):
                queue = groups.get(group)
                while queue and room > 0:
                    head = queue[0]
                    if self._expired(head) or head.future.cancelled():
                        self._pop_head(lane, group)  # drops it
                        progress = True
                        queue = groups.get(group)
                        continue
                    if self._key(head, overloaded) != key:
                        break
                    job = self._pop_head(lane, group)
                    if job is not None:
                        taken.append(job)
                        room -= 1
                        progress = True
                    break  # one per group per pass: round robin
                if room <= 0:
                    break
        return taken

    def _pop_head(self, lane: str, group: str) -> Job | None:
        """Pop the group's oldest job and move the group to the back of the round;
        returns None when that job was dropped (deadline passed, or withdrawn)."""
        groups = self._lanes[lane]
        queue = groups[group]
        job = queue.popleft()
        if queue:
            groups.move_to_end(group)
        else:
            del groups[group]
        self._forget(job)
        if self._expired(job):
            self._fail(job, AsrTimeout(f"{job.lane} {job.request.request_id} waited past its deadline"), "deadline")
            return None
        if not job.future.set_running_or_notify_cancel():
            return None  # withdrawn by its caller
        return job

    def _key(self, job: Job, overloaded: bool) -> Hashable:
        key = job._keys.get(overloaded)
        if key is None:
            key = job._keys[overloaded] = self.batch_key(job.request, overloaded)
        return key

    def _expired(self, job: Job) -> bool:
        deadline = job.request.deadline
        return deadline is not None and deadline <= self._wall()

    def _remove(self, job: Job) -> None:
        """Take a waiting job out of its queue (lock held)."""
        groups = self._lanes[job.lane]
        queue = groups.get(job.group)
        if queue is None:
            return
        try:
            queue.remove(job)
        except ValueError:
            return
        if not queue:
            del groups[job.group]
        self._forget(job)

    def _forget(self, job: Job) -> None:
        self._counts[job.lane] -= 1
        if self._by_id.get(job.request.request_id) is job:
            del self._by_id[job.request.request_id]
        if self._queued_partials.get(job.request.key) is job:
            del self._queued_partials[job.request.key]

    def _fail(self, job: Job, error: BaseException, reason: str) -> None:
        self.dropped[reason] += 1
        if job.future.set_running_or_notify_cancel():
            job.future.set_exception(error)

    # -- state
    @property
    def queued(self) -> int:
        """Requests waiting to run."""
        return self._counts["final"] + self._counts["partial"]

    @property
    def queued_finals(self) -> int:
        return self._counts["final"]

    @property
    def queued_partials(self) -> int:
        return self._counts["partial"]

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        with self._cond:
            return self.queued == 0 and self.running == 0

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until :attr:`idle`; False on timeout."""
        give_up = None if timeout is None else self._clock() + timeout
        with self._cond:
            while self.queued or self.running:
                wait = None if give_up is None else give_up - self._clock()
                if wait is not None and wait <= 0:
                    return False
                self._cond.wait(wait)
            return True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hand out nothing inside the block (a queue can then be built up whole, as tests do)."""
        with self._cond:
            self._paused = True
        try:
            yield
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def close(self) -> None:
        """Refuse new requests and drop waiting partials; waiting finals still run."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for queue in list(self._lanes["partial"].values()):
                for job in list(queue):
                    self._remove(job)
                    self._fail(job, TranscriberClosed(f"{self.name} closed before this partial ran"), "closed")
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
