"""The embedded transcriber: scheduler + runner threads + Whisper engine, in the gateway process.

This is ``asr_backend: embedded``, the default that runs on a laptop. The
pool worker (``earshot worker``) is built from the same three pieces; only
where requests come from and where results go differ.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable

from ..interface import AsrTimeout, TranscriptionRequest, TranscriptionResult
from ..runner import BatchRunner
from ..scheduler import AsrScheduler, Batch, SchedulerLimits
from .engine import WhisperEngine
from .guard import GuardThresholds

__all__ = ["WhisperTranscriber", "await_result"]


async def await_result(future: concurrent.futures.Future[TranscriptionResult] | asyncio.Future[TranscriptionResult],
                       request: TranscriptionRequest, wall_clock: Callable[[], float]) -> TranscriptionResult:
    """Await a result until the request's deadline; past it, :class:`AsrTimeout`.

    A request already running when its deadline passes finishes in the
    background (a decode cannot be interrupted), but nobody waits for it.
    """
    waiter = asyncio.wrap_future(future) if isinstance(future, concurrent.futures.Future) else future
    if request.deadline is None:
        return await waiter
    left = request.deadline - wall_clock()
    try:
        return await asyncio.wait_for(asyncio.shield(waiter), max(0.0, left))
    except asyncio.TimeoutError:
        waiter.cancel()  # withdraws it if it is still waiting
        raise AsrTimeout(f"no result for {request.kind} {request.request_id} by its deadline") from None
    except asyncio.CancelledError:
        waiter.cancel()
        raise


class WhisperTranscriber:
    """Transcriber running faster-whisper in threads of this process.

    Engine options are :class:`~gateway.asr.whisper.engine.WhisperEngine`'s
    (``workers`` is its ``threads``), or ``engine`` an engine already built;
    scheduling options are
    :class:`~gateway.asr.scheduler.SchedulerLimits`'. ``max_batch``: a thread
    that takes a request also takes up to ``max_batch - 1`` more that can
    share one encode + generate call (measured 10-15 % more throughput on 2
    CPU cores, docs/asr.md). ``batch_wait_s`` 0 (the default here) never waits
    for company: an idle queue gives a batch of one, the unbatched path.
    Under overload (more than ``overload_backlog`` finals waiting; 0 = never)
    finals take the short window of partials, about 2.5x faster for +0.7
    points WER, so latency stays bounded when finals arrive faster than full
    windows can be decoded.
    """

    def __init__(
        self,
        model: str = "tiny.en",
        *,
        device: str = "auto",
        compute_type: str = "default",
        cpu_threads: int = 0,
        workers: int = 1,
        beam_size: int = 2,
        window: str | float = "auto",
        local_files_only: bool = False,
        guard: GuardThresholds | None = None,
        max_batch: int = 2,
        batch_wait_s: float = 0.0,
        overload_backlog: int = 8,
        context_tokens: int = 32,
        decoder_threads: int = 1,
        limits: SchedulerLimits | None = None,
        on_batch: Callable[[Batch, float], None] | None = None,
        clock: Callable[[], float] | None = None,
        engine: WhisperEngine | None = None,
    ) -> None:
        if limits is None:
            limits = SchedulerLimits(max_batch=max_batch, batch_wait_s=batch_wait_s, overload_backlog=overload_backlog)
        if engine is None:
            engine = WhisperEngine(
                model,
                device=device,
                compute_type=compute_type,
                cpu_threads=cpu_threads,
                threads=workers,
                beam_size=beam_size,
                window=window,
                guard=guard,
                local_files_only=local_files_only,
                context_tokens=context_tokens,
                decoder_threads=decoder_threads,
            )
        self.engine = engine
        self.name = engine.name
        self.model_name = engine.model_name
        self._wall = clock or time.time
        self.scheduler = AsrScheduler(engine.batch_key, limits, wall_clock=self._wall, name=self.name)
        self.runner = BatchRunner(self.scheduler, engine, engine.threads, name="whisper", on_batch=on_batch)
        self.runner.start()

    # counters for metrics
    @property
    def queued(self) -> int:
        """Requests waiting for a thread."""
        return self.scheduler.queued

    @property
    def batches(self) -> int:
        return self.scheduler.batches

    @property
    def batched(self) -> int:
        return self.scheduler.batched

    @property
    def overloaded(self) -> int:
        return self.scheduler.overloaded

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        return await await_result(self.submit(request), request, self._wall)

    def submit(self, request: TranscriptionRequest) -> concurrent.futures.Future[TranscriptionResult]:
        """Queue a request; thread-safe. The asyncio API is :meth:`transcribe`."""
        return self.scheduler.submit(request)

    async def close(self) -> None:
        """Refuse new requests, drop queued partials, finish queued finals, stop the threads."""
        self.scheduler.close()
        if self.runner.alive:
            await asyncio.to_thread(self.runner.join)
