"""A transcriber that recognises nothing: the gateway's ``asr_model: none`` mode.

It exists to measure the media plane alone (RTP, jitter buffer, decode,
resampling, batched VAD, turn detection) without Whisper's cost, as
bench/media_plane.py does. Turns are still detected, resampled and handed
over; the result is always silence, so no transcript events are published.
"""

from __future__ import annotations

from .interface import TranscriptionRequest, TranscriptionResult


class MediaOnlyTranscriber:
    name = "none"

    def __init__(self) -> None:
        self.requests = 0
        self.audio_seconds = 0.0

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        self.requests += 1
        self.audio_seconds += request.seconds
        return self.result(request)

    def result(self, request: TranscriptionRequest) -> TranscriptionResult:
        """What every request gets at once: silence here (``stub`` answers words)."""
        return TranscriptionResult(
            text="", language=request.language or "", language_probability=0.0, avg_logprob=0.0,
            no_speech_prob=1.0, compression_ratio=0.0, audio_seconds=request.seconds,
            processing_seconds=0.0, model=self.name, silence=True,
        )

    async def close(self) -> None:
        return None
