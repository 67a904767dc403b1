"""The one narrow interface between the call path and speech recognition.

The call path hands a finished (or growing) turn to a :class:`Transcriber`
and awaits a :class:`TranscriptionResult`. Everything behind it is
replaceable: an in-process faster-whisper model
(:class:`gateway.asr.whisper.WhisperTranscriber`, the embedded default), a
pool of remote workers fed through Redis Streams
(:class:`gateway.asr.remote.pool.PoolTranscriber`), or any OpenAI-compatible
transcription server (:class:`gateway.asr.remote.openai.OpenAITranscriber`).
Keeping the messages plain (numpy audio in, strings and floats out) is what
lets a remote implementation serialize them without the call path noticing.

Failures a caller must tell apart are exceptions with a stable ``code``
(:class:`TranscriptionError`): the code is what ``turn.final`` carries in its
``error`` field (docs/events.md).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "SAMPLE_RATE",
    "TASKS",
    "Word",
    "SourceAudio",
    "AsrOverloaded",
    "AsrTimeout",
    "Superseded",
    "Transcriber",
    "TranscriberClosed",
    "TranscriptionError",
    "TranscriptionRequest",
    "TranscriptionResult",
]

SAMPLE_RATE = 16_000
"""Audio handed to a transcriber is always 16 kHz mono float32 (Whisper's native rate)."""

TASKS = ("transcribe", "translate")
"""What a request asks for: the speech as spoken, or translated to English (multilingual models only)."""


@dataclass(frozen=True, eq=False)  # compared by identity: it holds arrays
class SourceAudio:
    """The telephone audio a request's 16 kHz samples were made from, and how.

    ``audio`` is the turn as 16-bit PCM at ``rate`` (8 kHz G.711, decoded);
    ``context`` the context turns, in order, each followed by ``context_gap``
    zero samples at 16 kHz. ``upsample_8k_to_16k(audio, resampler)`` is the
    request's ``audio`` exactly, and the context turns upsampled one by one
    with their gaps its ``context_audio``: a remote recognizer that gets this
    rebuilds the very samples the embedded one decodes, from a quarter of the
    bytes of the float32 audio.
    """

    rate: int
    resampler: str
    audio: np.ndarray
    context: tuple[np.ndarray, ...] = ()
    context_gap: int = 0

    def __post_init__(self) -> None:
        if self.rate != 8000:
            raise ValueError(f"SourceAudio.rate must be 8000, got {self.rate!r}")
        for pcm in (self.audio, *self.context):
            if not isinstance(pcm, np.ndarray) or pcm.dtype != np.int16 or pcm.ndim != 1:
                raise ValueError("SourceAudio audio and context must be 1-D int16 arrays")
        if isinstance(self.context_gap, bool) or not isinstance(self.context_gap, int) or self.context_gap < 0:
            raise ValueError(f"SourceAudio.context_gap must be a non-negative integer, got {self.context_gap!r}")


@dataclass(frozen=True, eq=False)  # compared by identity: it holds arrays
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

    Scheduling: ``deadline`` is the wall-clock time (seconds since the epoch,
    so that it means the same on a worker on another machine) after which the
    result is worthless; a transcriber drops a request still waiting then and
    the caller gets :class:`AsrTimeout`. ``session`` groups the requests whose
    share of the recognizer is limited together (a call: one call's flood of
    turns must not starve the others); empty means ``key``. ``request_id``
    names the request on the wire (results of a job done twice are told
    apart by it); ``turn`` is the leg's turn number, for logs and metrics.
    ``source``, when the audio came from a telephone leg, is that audio at its
    native rate (:class:`SourceAudio`): what the pool sends on the wire.

    Options the call path never sets (REST uploads do): ``task`` "translate"
    asks for English text from speech in another language (an English-only
    model transcribes either way); ``word_timestamps`` asks for the result's
    ``words``, which costs an alignment pass after decoding.
    """

    audio: np.ndarray
    kind: Literal["partial", "final"]
    language: str | None = None
    prompt: str | None = None
    key: str = ""
    context_audio: np.ndarray | None = None
    context_text: str = ""
    deadline: float | None = None
    session: str = ""
    turn: int = 0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    source: SourceAudio | None = None  # what ``audio``/``context_audio`` were made from (telephone legs)
    task: Literal["transcribe", "translate"] = "transcribe"
    word_timestamps: bool = False

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
        if self.deadline is not None and not (isinstance(self.deadline, (int, float)) and math.isfinite(self.deadline)):
            raise ValueError(f"TranscriptionRequest.deadline must be a finite epoch time or None, got {self.deadline!r}")
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError("TranscriptionRequest.request_id must be a non-empty string")
        if self.task not in TASKS:
            raise ValueError(f"TranscriptionRequest.task must be one of {TASKS}, got {self.task!r}")
        if not isinstance(self.word_timestamps, bool):
            raise ValueError(f"TranscriptionRequest.word_timestamps must be a bool, got {self.word_timestamps!r}")

    @property
    def seconds(self) -> float:
        return self.audio.size / SAMPLE_RATE

    @property
    def fairness_group(self) -> str:
        """What this request's share of the recognizer is counted under."""
        return self.session or self.key


@dataclass(frozen=True)
class Word:
    """One word of a result and when it was said: seconds from the start of the request's ``audio``."""

    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class TranscriptionResult:
    """What the recognizer heard, with the confidence signals Whisper gives.

    ``silence`` is True when the guard decided there was no speech (energy
    too low, or the model itself said "no speech"); ``text`` is then "".
    ``words`` is filled only for a request with ``word_timestamps`` (and by
    a recognizer that can align words); empty otherwise.
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
    words: tuple[Word, ...] = ()


class Superseded(Exception):
    """A queued partial was replaced by a newer request for the same key before it ran."""


class TranscriberClosed(RuntimeError):
    """The transcriber was closed: the request was refused or dropped from its queue."""


class TranscriptionError(Exception):
    """A request that got no transcript, for a reason the caller reports by ``code``."""

    code = "asr-failed"


class AsrTimeout(TranscriptionError):
    """No result by the request's deadline (queue too long, worker gone, no worker at all)."""

    code = "asr-timeout"


class AsrOverloaded(TranscriptionError):
    """Refused at submission: the queue (or this session's share of it) is full."""

    code = "asr-overload"


@runtime_checkable
class Transcriber(Protocol):
    """Anything that turns a :class:`TranscriptionRequest` into a :class:`TranscriptionResult`.

    ``transcribe`` may raise :class:`Superseded` (partials only) or
    :class:`TranscriberClosed`, which callers treat as "no result, move on",
    or a :class:`TranscriptionError` (:class:`AsrTimeout` once the request's
    deadline has passed, :class:`AsrOverloaded`), whose ``code`` a final
    reports. Cancelling the awaiting task withdraws the request.
    """

    name: str

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult: ...

    async def close(self) -> None: ...
