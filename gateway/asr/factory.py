"""Build the transcriber (and, for workers, the engine) that the settings ask for.

One place maps settings to ASR objects, so that ``earshot run`` (any backend),
``earshot worker`` and the benchmarks build them the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .interface import Transcriber
from .scheduler import SchedulerLimits

if TYPE_CHECKING:
    from ..config import Settings
    from .whisper.engine import WhisperEngine

__all__ = ["build_engine", "build_transcriber", "scheduler_limits"]


def _window(settings: Settings) -> str | float:
    window: str | float = settings.asr_window
    return window if window in ("auto", "short") else float(window)


def scheduler_limits(settings: Settings) -> SchedulerLimits:
    return SchedulerLimits(max_batch=settings.asr_max_batch, batch_wait_s=settings.asr_batch_wait_ms / 1000.0,
                           overload_backlog=settings.asr_overload_backlog)


def build_engine(settings: Settings) -> WhisperEngine:
    """The Whisper engine of ``asr_model`` (loads the model: seconds, and GPU memory on a GPU)."""
    from .whisper.engine import WhisperEngine

    return WhisperEngine(
        settings.asr_model,
        device=settings.asr_device,
        compute_type=settings.asr_compute_type,
        cpu_threads=settings.asr_threads,
        threads=settings.asr_workers,
        beam_size=settings.asr_beam_size,
        window=_window(settings),
        local_files_only=settings.asr_local_files_only,
        context_tokens=settings.asr_context_tokens,
        decoder_threads=settings.asr_decoder_threads,
    )


def build_transcriber(settings: Settings, *, instance: str = "") -> Transcriber:
    """The gateway's transcriber for ``asr_backend``; a remote one still needs ``await start()``."""
    if settings.asr_backend == "pool":
        from .remote.pool import PoolTranscriber

        return PoolTranscriber(settings.redis_url, names=settings.asr_pool_names, instance=instance,
                               default_timeout_s=settings.asr_final_timeout_s,
                               stream_maxlen=settings.asr_pool_stream_maxlen,
                               session_limit=settings.asr_pool_session_limit)
    if settings.asr_backend == "openai":
        from .remote.openai import OpenAITranscriber

        return OpenAITranscriber(settings.asr_openai_url, api_key=settings.asr_openai_api_key,
                                 model=settings.asr_openai_model, concurrency=settings.asr_openai_concurrency,
                                 default_timeout_s=settings.asr_final_timeout_s)
    if settings.asr_model == "none":  # media plane only (capacity benchmarks)
        from .media_only import MediaOnlyTranscriber

        return MediaOnlyTranscriber()
    if settings.asr_model == "stub":  # everything but Whisper: placeholder text at once (capacity benchmarks)
        from .stub import StubTranscriber

        return StubTranscriber()
    from .whisper.transcriber import WhisperTranscriber  # imports faster-whisper: only when needed

    return WhisperTranscriber(engine=build_engine(settings), limits=scheduler_limits(settings))
