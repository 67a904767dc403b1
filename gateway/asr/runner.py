"""Threads that take batches from an :class:`~gateway.asr.scheduler.AsrScheduler` and
run them on an engine: the piece the embedded transcriber and the pool worker share.

CTranslate2 releases the GIL, so the event loop of the process (RTP in the
gateway, Redis in the worker) keeps running while a thread decodes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

from .interface import TranscriptionRequest, TranscriptionResult
from .scheduler import AsrScheduler, Batch

__all__ = ["BatchRunner", "Engine"]

log = logging.getLogger(__name__)


class Engine(Protocol):
    """A recognizer that decodes a batch in one call (``WhisperEngine``)."""

    name: str

    def batch_key(self, request: TranscriptionRequest, overloaded: bool) -> Hashable:
        """Requests with equal keys can share one call."""

    def transcribe_batch(
        self, requests: Sequence[TranscriptionRequest], *, overloaded: bool = False
    ) -> list[TranscriptionResult | BaseException]:
        """One result (or the exception of that request alone) per request, in order."""


class _BatchFailed(Exception):
    """The batch call as a whole raised; each request is then retried alone."""


class BatchRunner:
    """``threads`` threads running the scheduler's batches on ``engine``.

    ``on_start(batch)`` is called before a batch is decoded and
    ``on_batch(batch, seconds)`` after (metrics), both in the thread. A
    failing batch call is retried request by request, so one bad request
    cannot fail its batch-mates; an exception is delivered to its request's
    future and the thread lives on.
    """

    def __init__(
        self,
        scheduler: AsrScheduler,
        engine: Engine,
        threads: int = 1,
        *,
        name: str = "asr",
        on_batch: Callable[[Batch, float], None] | None = None,
        on_start: Callable[[Batch], None] | None = None,
    ) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer of at least 1, got {threads!r}")
        self.scheduler = scheduler
        self.engine = engine
        self.on_batch = on_batch
        self.on_start = on_start
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the threads to end (they end once the scheduler is closed and drained)."""
        for thread in self._threads:
            thread.join(timeout)

    def _work(self) -> None:
        scheduler = self.scheduler
        while (batch := scheduler.next_batch()) is not None:
            self._hook(self.on_start, batch)
            started = time.perf_counter()
            try:
                results = self._run(batch.requests, batch.overloaded)
                if len(batch.jobs) > 1 and isinstance(results[0], _BatchFailed):
                    results = [self._run([request], batch.overloaded)[0] for request in batch.requests]
                for job, result in zip(batch.jobs, results):
                    if isinstance(result, BaseException):
                        log.error("transcription failed (%s, %.2f s): %r", job.request.kind, job.request.seconds, result)
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
            finally:
                scheduler.finished(batch)
            self._hook(self.on_batch, batch, time.perf_counter() - started)

    @staticmethod
    def _hook(hook: Callable[..., None] | None, *args: object) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:  # noqa: BLE001  # metrics must not stop the recognizer
            log.exception("runner hook failed")

    def _run(self, requests: list[TranscriptionRequest], overloaded: bool) -> list[TranscriptionResult | BaseException]:
        try:
            return self.engine.transcribe_batch(requests, overloaded=overloaded)
        except Exception as exc:
            log.exception("transcription of %d request(s) failed", len(requests))
            return [_BatchFailed(exc)] * len(requests) if len(requests) > 1 else [exc]
