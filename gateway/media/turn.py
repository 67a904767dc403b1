"""Turn detection: VAD probabilities in, speech turns (audio + bounds) out.

Sans-I/O and one per call leg: :class:`TurnDetector` is fed each 32 ms chunk
with its speech probability and returns events saying when a turn starts,
when interim (partial) transcription is due, when a final transcription can
start speculatively, and when the turn is final. Positions are sample
indices in the leg's timeline, so transcripts can be aligned with the call.

End of turn is a two-step affair to hide ASR latency: after
``speculative_ms`` of silence :class:`TurnEnding` carries exactly the audio
a final would carry, so transcription can start while we wait out the rest
of ``silence_ms``; :class:`TurnResumed` cancels it if speech comes back.

With ``policy="semantic"`` the end of a turn is not a fixed silence: when a
pause reaches ``semantic_min_silence_ms`` the detector emits
:class:`EndOfTurnQuery` with the turn's latest audio, and the caller asks an
end-of-turn model whether the speaker has finished and hands the probability
back with :meth:`TurnDetector.answer`. Complete: the turn is final now, with
the same bounds as the :class:`TurnEnding` already sent, so the speculative
transcription is the final one. Incomplete, too late, or never answered: the
turn ends after ``semantic_max_silence_ms`` as under the silence rule, so a
slow or failing model costs latency, never a turn. Speech that resumes makes
the pending question stale; the next pause asks again.

The model hears only the sound; with ``semantic_text`` (the default) its
"complete" also needs the words: the caller hands the speculative final's
transcript back with :meth:`TurnDetector.transcript`, and a transcript that
reads as unfinished ("Please enter your ...", "You have two ...":
:func:`gateway.media.endofturn_text.unfinished`) keeps the turn open as an
"incomplete" answer would. The final cannot be published before that
transcript anyway, so waiting for it costs no latency. See docs/turns.md.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .endofturn_text import unfinished

__all__ = [
    "EndOfTurnQuery",
    "PartialDue",
    "TurnConfig",
    "TurnDetector",
    "TurnDiscarded",
    "TurnEnding",
    "TurnEvent",
    "TurnFinal",
    "TurnResumed",
    "TurnStarted",
]

#: A turn that hits ``max_turn_s`` is cut at the quietest chunk of this last stretch:
#: long enough to usually hold a breath between sentences, so no word is cut in two.
SPLIT_WINDOW_S = 4.0
#: ... but at most half the maximum turn length, and max_turn_s must exceed this.
MIN_MAX_TURN_S = 2.0
#: An :class:`EndOfTurnQuery` carries at most this much of the turn: what the
#: end-of-turn model (Smart Turn, gateway/media/endofturn.py) hears.
QUERY_WINDOW_S = 8.0
TurnPolicy = Literal["silence", "semantic"]
POLICIES: tuple[TurnPolicy, ...] = ("silence", "semantic")


@dataclass(frozen=True)
class TurnConfig:
    threshold: float = 0.5  # speech if prob >= threshold
    neg_threshold: float | None = None  # end-of-speech hysteresis; default threshold - 0.15
    silence_ms: int = 500  # silence that ends a turn
    min_speech_ms: int = 250  # shorter bursts are discarded (clicks, coughs)
    pad_before_ms: int = 300  # audio kept before the detected start
    pad_after_ms: int = 150  # audio kept after the last speech chunk
    speculative_ms: int = 200  # silence after which a speculative final starts (>= pad_after_ms, < silence_ms)
    max_turn_s: float = 20.0  # a longer turn is split
    partial_interval_ms: int = 1000  # interim transcripts while speaking; 0 disables
    # what ends a turn: "silence" (silence_ms) or "semantic" (an end-of-turn model, asked at each pause)
    policy: TurnPolicy = "silence"
    semantic_min_silence_ms: int = 150  # semantic: a pause this long asks the model (>= pad_after_ms)
    semantic_max_silence_ms: int = 1500  # semantic: a pause this long ends the turn whatever the model said
    semantic_threshold: float = 0.5  # semantic: P(complete) at or above ends the turn
    # semantic: a "complete" also needs the speculative final's text (TurnDetector.transcript) not to
    # read as unfinished; False: the model alone decides
    semantic_text: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        neg = self.negative_threshold
        if not 0.0 <= neg <= self.threshold:
            raise ValueError(f"neg_threshold must be in [0, threshold={self.threshold}], got {neg}")
        for name in ("silence_ms", "min_speech_ms", "pad_before_ms", "pad_after_ms", "speculative_ms", "partial_interval_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.silence_ms <= 0:
            raise ValueError(f"silence_ms must be > 0, got {self.silence_ms}")
        if not self.pad_after_ms <= self.speculative_ms < self.silence_ms:
            # The speculative audio must already hold the whole pad_after tail.
            raise ValueError(
                f"need pad_after_ms <= speculative_ms < silence_ms, got "
                f"{self.pad_after_ms}, {self.speculative_ms}, {self.silence_ms}"
            )
        if not (math.isfinite(self.max_turn_s) and self.max_turn_s > MIN_MAX_TURN_S):
            raise ValueError(f"max_turn_s must be > {MIN_MAX_TURN_S}, got {self.max_turn_s}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0.0 <= self.semantic_threshold <= 1.0:  # also rejects NaN
            raise ValueError(f"semantic_threshold must be in [0, 1], got {self.semantic_threshold}")
        if self.policy == "semantic" and not (
                self.pad_after_ms <= self.semantic_min_silence_ms < self.semantic_max_silence_ms):
            # The audio of the TurnEnding sent at the first pause must already hold the pad_after tail.
            raise ValueError(
                f"need pad_after_ms <= semantic_min_silence_ms < semantic_max_silence_ms, got "
                f"{self.pad_after_ms}, {self.semantic_min_silence_ms}, {self.semantic_max_silence_ms}"
            )

    @property
    def negative_threshold(self) -> float:
        """End-of-speech threshold: ``neg_threshold`` or ``threshold - 0.15`` (at least 0.01)."""
        if self.neg_threshold is not None:
            return self.neg_threshold
        return max(self.threshold - 0.15, 0.01)


@dataclass(frozen=True)
class TurnStarted:
    turn: int
    start_sample: int  # first sample of the turn's audio (pre-roll included)


# Events carrying audio compare by identity: numpy arrays have no single truth value.
@dataclass(frozen=True, eq=False)
class PartialDue:
    turn: int
    audio: np.ndarray = field(repr=False)
    start_sample: int
    end_sample: int


@dataclass(frozen=True, eq=False)
class TurnEnding:
    turn: int
    audio: np.ndarray = field(repr=False)
    start_sample: int
    end_sample: int


@dataclass(frozen=True)
class TurnResumed:
    turn: int


@dataclass(frozen=True, eq=False)
class TurnFinal:
    turn: int
    audio: np.ndarray = field(repr=False)
    start_sample: int
    end_sample: int
    reason: Literal["silence", "semantic", "max_length", "flush", "commit"]


@dataclass(frozen=True)
class TurnDiscarded:
    turn: int


@dataclass(frozen=True, eq=False)
class EndOfTurnQuery:
    """Semantic policy: a pause began; has the speaker finished? Answer with
    :meth:`TurnDetector.answer` (``query``). ``audio`` is the turn up to now (the
    pause included), at most its last :data:`QUERY_WINDOW_S`."""

    turn: int
    query: int  # counts up per detector; an answer to an older one is ignored
    audio: np.ndarray = field(repr=False)
    start_sample: int
    end_sample: int


TurnEvent = TurnStarted | PartialDue | TurnEnding | TurnResumed | TurnFinal | TurnDiscarded | EndOfTurnQuery


class TurnDetector:
    """Segments one call leg into turns from per-chunk speech probabilities.

    A chunk opens a turn when its probability reaches ``threshold``. While a
    turn is open a chunk counts as voiced if it reaches ``threshold``, or
    stays above ``neg_threshold`` before any silence (hysteresis, as in
    Silero's own iterator); silence is measured from the end of the last
    voiced chunk. Turn numbers count up from 0 and are never reused, so a
    :class:`TurnDiscarded` number simply never gets a final.

    Audio lives in one int16 buffer holding the open turn (at most
    ``max_turn_s`` plus a chunk) or, between turns, only the ``pad_before``
    pre-roll. Events get copies; no event's audio exceeds ``max_turn_s``.
    """

    def __init__(self, config: TurnConfig | None = None, sample_rate: int = 8000) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
        self.config = cfg = config if config is not None else TurnConfig()
        self.sample_rate = sample_rate
        ms = sample_rate / 1000
        self._threshold = cfg.threshold
        self._neg_threshold = cfg.negative_threshold
        self._silence = round(cfg.silence_ms * ms)
        self._min_speech = round(cfg.min_speech_ms * ms)
        self._pad_before = round(cfg.pad_before_ms * ms)
        self._pad_after = round(cfg.pad_after_ms * ms)
        self._speculative = round(cfg.speculative_ms * ms)
        self._max_turn = round(cfg.max_turn_s * sample_rate)
        self._partial = round(cfg.partial_interval_ms * ms)
        self._split_window = round(min(SPLIT_WINDOW_S, self.config.max_turn_s / 2) * sample_rate)
        self._semantic = cfg.policy == "semantic"
        self._semantic_threshold = cfg.semantic_threshold
        self._semantic_text = cfg.semantic_text
        self._min_silence = round(cfg.semantic_min_silence_ms * ms)
        self._max_silence = round(cfg.semantic_max_silence_ms * ms)
        # a turn too short to ask about is discarded after the silence rule's pause (or sooner)
        self._short_silence = min(self._silence, self._max_silence)
        # the speculative final starts at speculative_ms or at the question, whichever comes first
        self._semantic_ending = min(self._speculative, self._min_silence)
        self._query_window = round(QUERY_WINDOW_S * sample_rate)

        # Audio: self._buf[self._head:self._tail] holds samples from self._buf_start on.
        self._buf = np.zeros(max(self._pad_before, 1024), dtype=np.int16)
        self._head = 0
        self._tail = 0
        self._buf_start = 0
        self._pos: int | None = None  # sample after the last fed chunk; None before the first

        self._next_turn = 0
        self._turn: int | None = None  # open turn, None between turns
        self._turn_start = 0
        self._speech_start = 0
        self._last_voiced_end = 0
        self._in_silence = False
        self._ending_sent = False
        self._continued = False  # started by a max-length split: too late to discard
        self._asked = False  # semantic: this pause's question was sent
        self._query: int | None = None  # semantic: the question whose answer can still end the turn
        self._next_query = 0
        # semantic: this pause's TurnEnding (its end sample), whether the model said complete
        # while its transcript was not in yet, and what the transcript said
        self._ending_end: int | None = None
        self._model_complete = False
        self._text_reason: str | None = None
        self._text_judged = False
        self._next_partial = 0
        # (start, end, (prob to 0.1, energy)) within the split window: the split goes where
        # speech is least likely; in fluent speech, where VAD probabilities saturate, to the
        # quietest chunk
        self._recent: deque[tuple[int, int, tuple[float, float]]] = deque()

    # -- public API -------------------------------------------------------

    @property
    def position(self) -> int:
        """Sample index just after the last chunk fed (0 before any)."""
        return self._pos or 0

    @property
    def in_turn(self) -> bool:
        return self._turn is not None

    @property
    def buffered_samples(self) -> int:
        """Audio currently held: the open turn, or the pre-roll between turns."""
        return self._tail - self._head

    def feed(self, chunk: np.ndarray, probability: float, start_sample: int | None = None) -> list[TurnEvent]:
        """Process one chunk (1-D int16) and its speech probability.

        ``start_sample`` places the chunk in the leg's timeline; it may only
        differ from :attr:`position` on the first chunk or, skipping ahead,
        between turns (the pre-roll is then dropped).
        """
        if not isinstance(chunk, np.ndarray) or chunk.ndim != 1 or chunk.dtype != np.int16:
            raise ValueError(
                f"chunk must be a 1-D int16 numpy array, got "
                f"{getattr(chunk, 'dtype', type(chunk).__name__)} {getattr(chunk, 'shape', '')}"
            )
        if len(chunk) == 0:
            raise ValueError("chunk is empty")
        probability = float(probability)
        if not 0.0 <= probability <= 1.0:  # also rejects NaN
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        self._place(start_sample)

        start = self._pos
        end = start + len(chunk)
        self._append(chunk)
        self._pos = end
        events: list[TurnEvent] = []
        if self._turn is None:
            if probability >= self._threshold:
                self._open(start, end, _quietness(chunk, probability), events)
            else:
                self._trim_to(end - self._pad_before)
            return events

        self._recent.append((start, end, _quietness(chunk, probability)))
        while self._recent[0][0] < end - self._split_window:
            self._recent.popleft()

        if probability >= self._threshold or (probability >= self._neg_threshold and not self._in_silence):
            self._voiced(end, events)
        else:
            self._silent(end, events)
        return events

    @property
    def pending_query(self) -> int | None:
        """Semantic policy: the question whose answer would still count (None: none)."""
        return self._query

    def answer(self, query: int, probability: float) -> list[TurnEvent]:
        """The end-of-turn model's P(complete) for :class:`EndOfTurnQuery` ``query``.

        At or above ``semantic_threshold`` while the question is still current
        (no speech since, the turn still open) the turn is final now, reason
        ``semantic``, with the bounds of its :class:`TurnEnding`; with
        ``semantic_text`` only once the pause's transcript is in
        (:meth:`transcript`) and does not read as unfinished, so that
        "complete" may wait for it. Otherwise nothing happens: the turn goes
        on to ``semantic_max_silence_ms``.
        """
        probability = float(probability)
        if not 0.0 <= probability <= 1.0:  # also rejects NaN
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        if self._turn is None or query != self._query:
            return []  # stale: speech resumed, or the turn ended before the model answered
        self._query = None
        events: list[TurnEvent] = []
        if probability < self._semantic_threshold:
            return events
        if self._semantic_text and not self._text_judged:
            self._model_complete = True  # the transcript decides when it comes
        elif self._text_reason is None:
            self._close(min(self._last_voiced_end + self._pad_after, self.position), "semantic", events)
        return events

    def transcript(self, turn: int, end_sample: int, text: str | None) -> list[TurnEvent]:
        """Semantic policy with ``semantic_text``: the speculative final's transcript of the
        :class:`TurnEnding` of ``turn`` that ends at ``end_sample`` (None: the transcription
        failed, and the model decides alone).

        If the model already said complete and the text does not read as unfinished, the turn
        is final now, reason ``semantic``. A transcript that reads as unfinished makes this
        pause's "complete" count for nothing: the turn goes on to ``semantic_max_silence_ms``.
        A transcript of an ending no longer current (speech resumed since, the turn ended) is
        ignored, as is a second one for the same ending.
        """
        if not self.awaits_text(turn, end_sample):
            return []
        self._text_judged = True
        self._text_reason = None if text is None else unfinished(text)
        events: list[TurnEvent] = []
        if self._model_complete and self._text_reason is None:
            self._close(min(self._last_voiced_end + self._pad_after, self.position), "semantic", events)
        return events

    def awaits_text(self, turn: int, end_sample: int) -> bool:
        """Whether :meth:`transcript` for this ending would still count: the semantic policy with
        ``semantic_text``, the ending the current pause's, and its text not judged yet."""
        return (self._semantic and self._semantic_text and self._turn is not None and turn == self._turn
                and self._in_silence and self._ending_end == end_sample and not self._text_judged)

    @property
    def text_unfinished(self) -> str | None:
        """Why the current pause's transcript reads as unfinished (None: it does not, or it is
        not in yet, or no pause is current): for logging."""
        return self._text_reason

    def flush(self) -> list[TurnEvent]:
        """Call end: finalise the open turn (or discard it if too short)."""
        events: list[TurnEvent] = []
        if self._turn is not None:
            self._close(min(self._last_voiced_end + self._pad_after, self._pos), "flush", events)
        return events

    # -- state transitions ------------------------------------------------

    def _open(self, start: int, end: int, quietness: tuple[float, float], events: list[TurnEvent]) -> None:
        # The buffer was trimmed at the previous turn's end, so pre-roll never overlaps it.
        turn_start = max(start - self._pad_before, self._buf_start)
        self._trim_to(turn_start)
        self._begin(turn_start, start, end, continued=False, events=events)
        self._recent.append((start, end, quietness))

    def _begin(self, turn_start: int, speech_start: int, voiced_end: int, *, continued: bool, events: list[TurnEvent]) -> None:
        self._turn = self._next_turn
        self._next_turn += 1
        self._turn_start = turn_start
        self._speech_start = speech_start
        self._last_voiced_end = voiced_end
        self._in_silence = False
        self._ending_sent = False
        self._asked = False
        self._query = None
        self._forget_pause()
        self._continued = continued
        self._next_partial = speech_start + self._partial
        events.append(TurnStarted(self._turn, turn_start))

    def _voiced(self, end: int, events: list[TurnEvent]) -> None:
        assert self._turn is not None
        if self._in_silence:
            self._in_silence = False
            self._asked = False
            self._query = None  # the pause is over: an answer about it no longer counts
            self._forget_pause()
            if self._ending_sent:
                self._ending_sent = False
                events.append(TurnResumed(self._turn))
        self._last_voiced_end = end
        if end - self._turn_start >= self._max_turn:
            self._split(events)
            return
        if self._partial and end >= self._next_partial and self._long_enough():
            events.append(PartialDue(self._turn, self._audio(self._turn_start, end), self._turn_start, end))
            # Keep the cadence on the speech-start grid, skipping partials missed in pauses.
            missed = (end - self._next_partial) // self._partial
            self._next_partial += (missed + 1) * self._partial

    def _silent(self, end: int, events: list[TurnEvent]) -> None:
        assert self._turn is not None
        self._in_silence = True
        silence = end - self._last_voiced_end
        final_end = min(self._last_voiced_end + self._pad_after, end)
        if self._semantic:
            self._silent_semantic(end, silence, final_end, events)
        elif silence >= self._silence:
            self._close(final_end, "silence", events)
        elif end - self._turn_start >= self._max_turn:
            self._close(final_end, "max_length", events)
        elif silence >= self._speculative and not self._ending_sent and self._long_enough():
            self._ending_sent = True
            events.append(TurnEnding(self._turn, self._audio(self._turn_start, final_end), self._turn_start, final_end))

    def _silent_semantic(self, end: int, silence: int, final_end: int, events: list[TurnEvent]) -> None:
        assert self._turn is not None
        long_enough = self._long_enough()
        if silence >= self._max_silence or (not long_enough and silence >= self._short_silence):
            self._close(final_end, "silence", events)
        elif end - self._turn_start >= self._max_turn:
            self._close(final_end, "max_length", events)
        elif long_enough:
            if silence >= self._semantic_ending and not self._ending_sent:
                self._ending_sent = True
                self._ending_end = final_end
                events.append(TurnEnding(self._turn, self._audio(self._turn_start, final_end), self._turn_start, final_end))
            if silence >= self._min_silence and not self._asked:
                self._asked = True
                self._query = query = self._next_query
                self._next_query += 1
                start = max(self._turn_start, end - self._query_window)
                events.append(EndOfTurnQuery(self._turn, query, self._audio(start, end), start, end))

    def _forget_pause(self) -> None:
        self._ending_end = None
        self._model_complete = False
        self._text_reason = None
        self._text_judged = False

    def _split(self, events: list[TurnEvent]) -> None:
        """Max length while speaking: cut in the quietest recent chunk and carry on."""
        assert self._turn is not None
        start, end, _ = min(self._recent, key=lambda item: item[2])
        # Mid-chunk, and never past max_turn_s (the chunk may straddle it).
        split = min(start + (end - start) // 2, self._turn_start + self._max_turn)
        events.append(TurnFinal(self._turn, self._audio(self._turn_start, split), self._turn_start, split, "max_length"))
        self._trim_to(split)
        while self._recent and self._recent[0][1] <= split:
            self._recent.popleft()
        self._begin(split, split, self._pos, continued=True, events=events)

    def _close(self, final_end: int, reason: Literal["silence", "semantic", "max_length", "flush"],
               events: list[TurnEvent]) -> None:
        assert self._turn is not None
        self._query = None
        final_end = min(final_end, self._turn_start + self._max_turn)
        if self._long_enough():
            audio = self._audio(self._turn_start, final_end)
            events.append(TurnFinal(self._turn, audio, self._turn_start, final_end, reason))
        else:
            events.append(TurnDiscarded(self._turn))
        self._turn = None
        self._recent.clear()
        self._trim_to(max(final_end, self._pos - self._pad_before))

    def _long_enough(self) -> bool:
        return self._continued or self._last_voiced_end - self._speech_start >= self._min_speech

    # -- audio buffer -----------------------------------------------------

    def _place(self, start_sample: int | None) -> None:
        if self._pos is None:
            first = 0 if start_sample is None else int(start_sample)
            if first < 0:
                raise ValueError(f"start_sample must be >= 0, got {start_sample}")
            self._pos = self._buf_start = first
            return
        if start_sample is None or start_sample == self._pos:
            return
        if self._turn is not None or start_sample < self._pos:
            raise ValueError(
                f"start_sample {start_sample} does not follow the previous chunk (expected {self._pos}); "
                "a gap is only allowed between turns"
            )
        # Skip ahead between turns: the pre-roll is no longer adjacent.
        self._head = self._tail = 0
        self._pos = self._buf_start = int(start_sample)

    def _append(self, chunk: np.ndarray) -> None:
        n = len(chunk)
        if self._tail + n > len(self._buf):
            live = self._tail - self._head
            if live + n > len(self._buf) // 2:
                # Grow (amortised doubling); bounded since a turn never exceeds max_turn.
                grown = np.empty(max(2 * len(self._buf), live + n), dtype=np.int16)
                grown[:live] = self._buf[self._head : self._tail]
                self._buf = grown
            else:
                self._buf[:live] = self._buf[self._head : self._tail]
            self._head, self._tail = 0, live
        self._buf[self._tail : self._tail + n] = chunk
        self._tail += n

    def _trim_to(self, sample: int) -> None:
        """Drop audio before ``sample``."""
        drop = sample - self._buf_start
        if drop > 0:
            drop = min(drop, self._tail - self._head)
            self._head += drop
            self._buf_start += drop

    def _audio(self, start: int, end: int) -> np.ndarray:
        offset = self._head - self._buf_start
        return self._buf[start + offset : end + offset].copy()


def _quietness(chunk: np.ndarray, probability: float) -> tuple[float, float]:
    """Sort key for split points: speech probability (to 0.1), then mean energy."""
    samples = chunk.astype(np.float32)
    return (round(probability, 1), float(np.dot(samples, samples)) / max(1, samples.size))
