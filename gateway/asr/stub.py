"""A transcriber that answers at once with placeholder words: ``asr_model: stub``.

bench/media_plane.py runs the gateway with it to measure everything a call
costs except Whisper: RTP, jitter buffer, decode, batched VAD, turn
detection, resampling, and then the events (partials and finals) published to
Redis and persisted to SQL, as with a real model. The text has about as many
words as speech of that length would (2.5 per second), so the events are of a
realistic size. Never for production: it hears nothing.
"""

from __future__ import annotations

from .interface import TranscriptionRequest, TranscriptionResult
from .media_only import MediaOnlyTranscriber

__all__ = ["StubTranscriber"]

WORDS = ("please", "hold", "while", "we", "connect", "your", "call", "to", "the", "next", "agent")
WORDS_PER_SECOND = 2.5


def placeholder_text(seconds: float) -> str:
    count = max(1, round(seconds * WORDS_PER_SECOND))
    return " ".join(WORDS[i % len(WORDS)] for i in range(count))


class StubTranscriber(MediaOnlyTranscriber):
    """Counts requests as ``none`` does, but answers placeholder words instead of silence."""

    name = "stub"

    def result(self, request: TranscriptionRequest) -> TranscriptionResult:
        return TranscriptionResult(
            text=placeholder_text(request.seconds), language=request.language or "en", language_probability=1.0,
            avg_logprob=0.0, no_speech_prob=0.0, compression_ratio=1.0, audio_seconds=request.seconds,
            processing_seconds=0.0, model=self.name, silence=False,
        )
