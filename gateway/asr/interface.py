"""The one narrow interface between the call path and speech recognition.

The call path hands a finished (or growing) turn to a :class:`Transcriber`
and awaits a :class:`TranscriptionResult`. Everything behind it is
replaceable: today an in-process faster-whisper model
(:class:`gateway.asr.whisper.WhisperTranscriber`), later a pool of remote GPU
workers fed through Redis Streams with cross-call batching. Keeping the
messages plain (numpy audio in, strings and floats out) is what lets a remote
implementation serialize them without the call path noticing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "SAMPLE_RATE",
    "Superseded",
    "Transcriber",
    "TranscriberClosed",
    "TranscriptionRequest",
    "TranscriptionResult",
]

SAMPLE_RATE = 16_000
"""Audio handed to a transcriber is always 16 kHz mono float32 (Whisper's native rate)."""


@dataclass(frozen=True)
class TranscriptionRequest:
    """One turn (or the audio of a turn so far) to transcribe.

    ``kind`` sets priority: finals are never dropped and run before partials;
    a partial still waiting in a queue is worthless once a newer request for
    the same ``key`` arrives, so it is superseded instead of transcribed.
    An empty ``key`` opts out of superseding.

    Context, both optional: ``prompt`` is earlier text of the conversation;
    ``context_audio`` is audio heard just before ``audio`` (the leg's previous
    turns) and ``context_text`` its transcript. A transcriber may let the
    model hear the turn after its context, as offline transcription of the
    whole call would, but the result always covers ``audio`` alone.
    """

    audio: np.ndarray
    kind: Literal["partial", "final"]
    language: str | None = None
    prompt: str | None = None
    key: str = ""
    context_audio: np.ndarray | None = None
    context_text: str = ""

    def __post_init__(self) -> None:
        audio = self.audio
        if not isinstance(audio, np.ndarray):
            raise TypeError(f"TranscriptionRequest.audio must be a numpy array, got {type(audio).__name__}")
        if audio.dtype != np.float32:
            raise ValueError(f"TranscriptionRequest.audio must be float32 at 16 kHz, got dtype {audio.dtype}")
        if audio.ndim != 1:
            raise ValueError(f"TranscriptionRequest.audio must be mono (1-D), got shape {audio.shape}")
        if self.kind not in ("partial", "final"):
            raise ValueError(f"TranscriptionRequest.kind must be 'partial' or 'final', got {self.kind!r}")
        if audio.size and not np.isfinite(audio).all():
            raise ValueError("TranscriptionRequest.audio contains NaN or infinite samples")
        context = self.context_audio
        if context is not None:
            if not isinstance(context, np.ndarray) or context.dtype != np.float32 or context.ndim != 1:
                raise ValueError("TranscriptionRequest.context_audio must be 1-D float32 at 16 kHz")
            if context.size and not np.isfinite(context).all():
                raise ValueError("TranscriptionRequest.context_audio contains NaN or infinite samples")
            if not self.context_text.strip():
                raise ValueError("TranscriptionRequest.context_audio needs its transcript in context_text")

    @property
    def seconds(self) -> float:
        return self.audio.size / SAMPLE_RATE


@dataclass(frozen=True)
class TranscriptionResult:
    """What the recognizer heard, with the confidence signals Whisper gives.

    ``silence`` is True when the guard decided there was no speech (energy
    too low, or the model itself said "no speech"); ``text`` is then "".
    """

    text: str
    language: str
    language_probability: float
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    audio_seconds: float
    processing_seconds: float
    model: str
    silence: bool


class Superseded(Exception):
    """A queued partial was replaced by a newer request for the same key before it ran."""


class TranscriberClosed(RuntimeError):
    """The transcriber was closed: the request was refused or dropped from its queue."""


@runtime_checkable
class Transcriber(Protocol):
    """Anything that turns a :class:`TranscriptionRequest` into a :class:`TranscriptionResult`.

    ``transcribe`` may raise :class:`Superseded` (partials only) or
    :class:`TranscriberClosed`; callers treat both as "no result, move on".
    """

    name: str

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult: ...

    async def close(self) -> None: ...
