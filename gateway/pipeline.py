"""One call leg's media pipeline after RTP: chunking -> VAD -> turns -> ASR -> events.

The leg is fed decoded 8 kHz audio by the call's RTP receiver, hands 32 ms
chunks to the shared :class:`~gateway.media.vad.BatchedVadRunner` (which calls
:meth:`on_vad` back), and turns the turn detector's events into ASR requests and
published transcript events.

The final transcription starts speculatively as soon as the detector reports
``TurnEnding`` (a short silence), and is published the moment ``TurnFinal``
confirms the end: the silence threshold and the ASR run overlap instead of
adding up. Finals are published strictly in turn order; a partial is dropped
rather than published out of order.

With the semantic turn policy the detector asks at each pause whether the
speaker has finished (``EndOfTurnQuery``): the leg hands the turn's last 8 s
at 16 kHz to the injected ``end_of_turn`` model (off the event loop) and gives
the answer back to the detector, which may end the turn there. A model that
fails or is missing only makes the turn wait for ``semantic_max_silence_ms``.

Each turn is decoded in the context of the leg's earlier turns, as offline
transcription of the whole call would hear it: their text as the request's
``prompt`` and, for finals, up to ``context_audio_s`` of their audio with its
transcript (``context_audio``/``context_text``). A final therefore waits for
the previous turn's text, which it would wait for anyway to be published in
order.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from .asr.interface import (
    SourceAudio,
    Superseded,
    TranscriberClosed,
    Transcriber,
    TranscriptionError,
    TranscriptionRequest,
    TranscriptionResult,
)
from .events import TURN_FINAL, TURN_PARTIAL, Event, EventFactory
from .media.resample import upsample_8k_to_16k
from .media.wideband import Decimator, SampleHistory
from .output.redact import Release, Redactor
from .media.turn import (
    EndOfTurnQuery,
    PartialDue,
    TurnConfig,
    TurnDetector,
    TurnDiscarded,
    TurnEnding,
    TurnFinal,
    TurnResumed,
    TurnStarted,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 8000
CHUNK = 256  # 32 ms at 8 kHz: Silero's chunk size
CHUNK_BYTES = CHUNK * 2
_SILENT_CHUNK = np.zeros(CHUNK, np.int16)  # what a chunk shed from the backlog is heard as


# Context for the next turn: the last few finals' texts (the transcriber keeps only
# the prompt's last tokens) and audio. A final that Whisper itself doubts is left
# out, so one bad decode does not steer the next turn (faster-whisper drops its
# prompt likewise).
CONTEXT_TURNS = 4  # finals in the text prompt
CONTEXT_MIN_LOGPROB = -1.0
CONTEXT_MAX_COMPRESSION = 2.4
CONTEXT_GAP_S = 0.3  # silence laid between context turns and before the new one (docs/asr.md)
_NO_AUDIO = np.zeros(0, np.float32)
_NO_PCM = np.zeros(0, np.int16)

# Input samples (8 kHz) on each side that a resampler's output depends on: the polyphase
# filter reaches 32, ratecv 1; 512 (64 ms) leaves room for soxr's longer filter.
RESAMPLE_MARGIN = 512


@dataclass
class _Resampled:
    turn: int
    start_sample: int
    samples: int  # 8 kHz input samples resampled
    out: np.ndarray  # their 16 kHz float32 samples


@dataclass(frozen=True, eq=False)
class _Context:
    """A trusted final kept as context: its text, its 16 kHz audio and that audio's 8 kHz source."""

    text: str
    audio: np.ndarray
    pcm: np.ndarray


# What a leg tells an observer (a streaming API connection) about its turns, beside the
# events it publishes. ``turn`` is the leg's own turn index (from 0, every turn the VAD
# opened, published or not); offsets are ms in the session, like the events' start_ms.
@dataclass(frozen=True)
class SpeechStarted:
    leg: str
    turn: int
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    leg: str
    turn: int
    audio_end_ms: int


@dataclass(frozen=True)
class TurnPublished:
    """The turn's ``turn.partial`` or ``turn.final`` event, as handed to the publisher."""

    leg: str
    turn: int
    event: Event


@dataclass(frozen=True)
class TurnDropped:
    """The turn ends without a final: too short a burst, no words in it, or cleared."""

    leg: str
    turn: int
    reason: str  # "too-short", "no-speech", "cleared"


@dataclass(frozen=True)
class TurnEndHeard:
    """The VAD reached the point of an :meth:`LegPipeline.end_turn`: ``turn`` is the turn it
    ended there (its SpeechStopped came just before), None when no turn was open."""

    leg: str
    turn: int | None


LegObservation = SpeechStarted | SpeechStopped | TurnPublished | TurnDropped | TurnEndHeard

#: The end-of-turn model as a leg sees it: 16 kHz float32 audio ending now -> P(the turn is
#: complete). In the gateway, gateway.media.endofturn.EndOfTurnRunner.probability.
EndOfTurn = Callable[[np.ndarray], Awaitable[float]]


@dataclass(frozen=True)
class _Pending:
    """A final's payload (text not yet redacted) waiting for the redactor to release it."""

    data: dict[str, object]
    turn: int  # the detector's turn index (for the observer)
    speech_end: float


@dataclass
class _Speculation:
    start_sample: int
    end_sample: int
    task: asyncio.Task[TranscriptionResult]


class LegPipeline:
    """Implements the VadStream protocol for one leg of one call."""

    def __init__(
        self,
        *,
        key: str,
        leg: str,
        events: EventFactory,
        publish: Callable[[Event], None],
        transcriber: Transcriber,
        turn_config: TurnConfig,
        language: str | None,
        resampler: str = "polyphase",
        partials: bool = True,
        context: bool = True,
        context_audio_s: float = 0.0,
        origin_ms: Callable[[], float] = lambda: 0.0,
        on_final: Callable[[str, TranscriptionResult | None, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        session: str = "",
        final_timeout_s: float | None = None,
        partial_timeout_s: float | None = None,
        wall_clock: Callable[[], float] = time.time,
        wideband: bool = False,
        manual_turns: bool = False,
        observer: Callable[[LegObservation], None] | None = None,
        end_of_turn: EndOfTurn | None = None,
        redactor: "Redactor[_Pending] | None" = None,
        max_backlog: int = 0,
    ) -> None:
        """``wideband``: the leg is fed 16 kHz audio (:meth:`feed_wideband`), which Whisper hears
        as it is, while the VAD hears an 8 kHz copy. ``manual_turns``: the VAD does not end turns;
        :meth:`commit` does (OpenAI Realtime with ``turn_detection: null``). ``end_of_turn``: the
        model the semantic policy asks at a pause; without one such turns end at
        ``semantic_max_silence_ms``. ``redactor``: PCI redaction of every text before it is
        published (gateway/output/redact.py); it may hold a final back to read it with the next."""
        self.key = key
        self.leg = leg
        self.session = session
        self._final_timeout_s = final_timeout_s
        self._partial_timeout_s = partial_timeout_s
        self._wall = wall_clock
        self._events = events
        self._publish = publish
        self._transcriber = transcriber
        self._config = turn_config
        self._language = language
        self._resampler = resampler
        self._partials = partials and turn_config.partial_interval_ms > 0
        self._use_context = context
        self._context_audio_s = context_audio_s if context else 0.0
        # (text, 16 kHz audio, its 8 kHz source) of the leg's recent trusted finals, oldest first
        self._context: collections.deque[_Context] = collections.deque(maxlen=2 * CONTEXT_TURNS)
        self._turn_audio: dict[int, _Context] = {}  # audio of each final's request, until published
        self._origin_ms = origin_ms
        self._on_final = on_final
        self._clock = clock
        self._detector = TurnDetector(turn_config, sample_rate=SAMPLE_RATE)
        self._pending = bytearray()
        self._ready: collections.deque[tuple[np.ndarray, float]] = collections.deque()
        self._inflight: collections.deque[float] = collections.deque()
        # arrival time of each processed chunk, for end-of-speech -> publish latency
        horizon = int((turn_config.max_turn_s + 10) * SAMPLE_RATE / CHUNK)
        self._arrivals: collections.deque[float] = collections.deque(maxlen=horizon)
        self._processed = 0
        self._seq_of: dict[int, int] = {}
        self._next_seq = 1
        self._partials_published: dict[int, int] = {}
        self._speculations: dict[int, _Speculation] = {}
        self._final_chain: asyncio.Task[None] | None = None
        self._resampled: _Resampled | None = None
        self._partial_tasks: set[asyncio.Task[None]] = set()
        self._finalised_through = -1  # highest detector turn whose final is decided
        self.turns_published = 0
        self.closed = False
        # who speaks on this leg (SIPREC: role, participant, number; docs/siprec.md), added to every
        # turn event; replaced, not mutated, when a metadata update changes the leg's participant
        self.identity: dict[str, str] = {}
        self.wideband = wideband
        self._decimator = Decimator() if wideband else None
        keep = int((turn_config.max_turn_s + 10 + context_audio_s) * 2 * SAMPLE_RATE)
        self._history = SampleHistory(keep) if wideband else None
        self.manual_turns = manual_turns
        self._observer = observer
        self._end_of_turn = end_of_turn
        self._queries: set[asyncio.Task[None]] = set()
        self._end_of_turn_failed = False  # logged once per leg
        self._redactor = redactor
        self._redaction_timer: asyncio.TimerHandle | None = None
        self._turn_open = False  # the VAD is in a turn (a held final waits for its final)
        # backlog cap: beyond max_backlog chunks waiting for the VAD, the oldest are shed (their audio
        # dropped) and later heard as silence without the model, so memory stays bounded and the
        # timeline exact while the VAD is behind; 0: no cap
        self._max_backlog = max_backlog
        self._shed = 0  # shed chunks not yet heard: they come right after those in flight
        self.shed_chunks = 0
        self._manual_start = 0  # first 8 kHz sample of the uncommitted buffer (manual turns)
        self._manual_turn = 0
        self._fed = 0  # 8 kHz samples fed (chunked or pending)
        self._cleared_through = 0  # chunks (by index) that a clear() turned into silence
        self._turn_ends: collections.deque[int] = collections.deque()  # chunk counts where end_turn() cuts
        # manual turns on a telephone-rate leg: the 8 kHz audio since the last commit
        self._manual_audio = SampleHistory(int(turn_config.max_turn_s * SAMPLE_RATE) + CHUNK) \
            if manual_turns and not wideband else None

    # -- input from the RTP receiver
    def feed_audio(self, pcm: bytes, now: float) -> None:
        """Append decoded 16-bit 8 kHz PCM; whole 32 ms chunks become ready for VAD."""
        pending = self._pending
        pending += pcm
        self._fed += len(pcm) // 2
        if self._manual_audio is not None:
            self._manual_audio.append(np.frombuffer(pcm, dtype="<i2"))
        if self.manual_turns and self._fed - self._manual_start >= self._detector._max_turn:
            self.commit(now)  # a client that never commits still gets turns of at most max_turn_s
        while len(pending) >= CHUNK_BYTES:
            chunk = np.frombuffer(bytes(pending[:CHUNK_BYTES]), dtype=np.int16)
            del pending[:CHUNK_BYTES]
            self._ready.append((chunk, now))
        if self._max_backlog and len(self._ready) > self._max_backlog:
            excess = len(self._ready) - self._max_backlog
            if not self.shed_chunks:
                log.warning("%s: more than %d chunks wait for the VAD; shedding the oldest as silence",
                            self.key, self._max_backlog)
            for _ in range(excess):
                self._ready.popleft()
            self._shed += excess
            self.shed_chunks += excess

    def feed_wideband(self, pcm: np.ndarray, now: float) -> None:
        """Append 16 kHz int16 audio (a wideband leg): kept for ASR, decimated for the VAD."""
        assert self._decimator is not None and self._history is not None, "not a wideband leg"
        self._history.append(pcm)
        self.feed_audio(self._decimator.feed(pcm).tobytes(), now)

    # -- manual turns (no turn detection: the client commits)
    def commit(self, now: float) -> int | None:
        """End the uncommitted audio as a turn (reason ``commit``); its index, or None when empty."""
        if not self.manual_turns:
            raise RuntimeError("commit() needs manual_turns")
        end = self._fed
        if end <= self._manual_start:
            return None
        turn = self._manual_turn
        self._manual_turn += 1
        start, self._manual_start = self._manual_start, end
        audio = self._narrow(start, end)
        self._arrivals.append(now)
        self._finalise(TurnFinal(turn=turn, audio=audio, start_sample=start, end_sample=end, reason="commit"),
                       speech_end=now)
        return turn

    def clear(self) -> None:
        """Drop the audio not yet part of a decided turn (Realtime ``input_audio_buffer.clear``)."""
        if self.manual_turns:
            self._manual_start = self._fed
            return
        # chunks already appended but not yet through the VAD belong to the cleared buffer too
        self._cleared_through = self._processed + len(self._inflight) + self._shed + len(self._ready)
        self._pending[:] = bytes(len(self._pending))  # and the part of a chunk not yet complete
        for event in self._detector.flush():
            if isinstance(event, (TurnFinal, TurnDiscarded)):
                self._cancel_speculation(event.turn)
                self._finalised_through = max(self._finalised_through, event.turn)
                self._observe(TurnDropped(self.leg, event.turn, "cleared"))

    @property
    def origin_ms(self) -> float:
        """Where the leg's sample 0 sits in the session, in ms: what its events' start_ms count from
        (the recording places the leg's audio there too)."""
        return self._origin_ms()

    @property
    def uncommitted_ms(self) -> int:
        """Manual turns: length of the audio that :meth:`commit` would transcribe."""
        return (self._fed - self._manual_start) * 1000 // SAMPLE_RATE

    def _narrow(self, start: int, end: int) -> np.ndarray:
        """8 kHz audio [start, end) of a manual turn (for context bookkeeping and the pool's source)."""
        if self._history is not None:
            return np.zeros(end - start, np.int16)  # wideband: the 16 kHz history is what is heard
        return self._manual_audio.slice(start, end)

    def _observe(self, observation: LegObservation) -> None:
        if self._observer is not None:
            try:
                self._observer(observation)
            except Exception:
                log.exception("leg observer failed for %s", self.key)

    # -- VadStream protocol
    def next_chunk(self) -> np.ndarray | None:
        if self._shed and not self._inflight:
            self._hear_shed()
        if not self._ready:
            return None
        chunk, arrival = self._ready.popleft()
        self._inflight.append(arrival)
        return chunk

    def on_vad(self, chunk: np.ndarray, probability: float) -> None:
        arrival = self._inflight.popleft() if self._inflight else self._clock()
        self._arrivals.append(arrival)
        if self._processed < self._cleared_through:
            probability = 0.0  # appended before a clear: heard as silence, so the timeline stays exact
        self._processed += 1
        for event in self._detector.feed(chunk, probability):
            self._handle(event)
        self._end_turns_due()
        if self._shed and not self._inflight:
            self._hear_shed()

    def _hear_shed(self) -> None:
        """The chunks shed from the backlog, in their place on the timeline: silence."""
        shed, self._shed = self._shed, 0
        for _ in range(shed):
            self._inflight.append(self._clock())
            self.on_vad(_SILENT_CHUNK, 0.0)

    def end_turn(self) -> None:
        """Turn detection on: end the open turn (reason ``commit``) right after the last complete
        chunk appended so far, once the VAD has heard it; a client's "transcribe what I sent now".
        Audio appended after this call belongs to the next turn. :class:`TurnEndHeard` follows."""
        if self.manual_turns:
            raise RuntimeError("end_turn() is for legs with turn detection; use commit()")
        self._turn_ends.append(self._processed + len(self._inflight) + self._shed + len(self._ready))
        self._end_turns_due()

    def _end_turns_due(self) -> None:
        while self._turn_ends and self._processed >= self._turn_ends[0]:
            self._turn_ends.popleft()
            ended: int | None = None
            for event in self._detector.flush():
                if isinstance(event, TurnFinal):
                    event = dataclasses.replace(event, reason="commit")
                if isinstance(event, (TurnFinal, TurnDiscarded)):
                    ended = event.turn  # a discarded one is reported as TurnDropped just before
                self._handle(event)
            self._observe(TurnEndHeard(self.leg, ended))

    @property
    def has_backlog(self) -> bool:
        return bool(self._ready) or bool(self._inflight) or bool(self._shed)

    # -- turn events
    def _handle(self, event: object) -> None:
        if self.manual_turns:
            return  # the client ends turns (commit); the VAD only runs for its cost's sake
        if isinstance(event, (TurnFinal, TurnDiscarded)):
            self._turn_open = False
        if isinstance(event, TurnStarted):
            self._turn_open = True
            if self._redactor is not None and self._redactor.holding:
                self._redactor.speech(self._clock())  # a held final waits for this turn's final
                self._arm_redaction()
            origin = self._origin_ms()
            self._observe(SpeechStarted(self.leg, event.turn, round(origin + event.start_sample * 1000 / SAMPLE_RATE)))
            return
        if isinstance(event, PartialDue):
            if self._partials:
                self._start_partial(event)
        elif isinstance(event, TurnEnding):
            self._cancel_speculation(event.turn)
            task = asyncio.create_task(self._transcribe(event, "final", after=self._final_chain))
            self._speculations[event.turn] = _Speculation(event.start_sample, event.end_sample, task)
            # semantic policy: the detector reads the speculative text too (docs/turns.md)
            task.add_done_callback(lambda done, ending=event: self._speculation_heard(ending, done))
        elif isinstance(event, TurnResumed):
            self._cancel_speculation(event.turn)
        elif isinstance(event, EndOfTurnQuery):
            self._ask_end_of_turn(event)
        elif isinstance(event, TurnFinal):
            origin = self._origin_ms()
            self._observe(SpeechStopped(self.leg, event.turn, round(origin + event.end_sample * 1000 / SAMPLE_RATE)))
            self._finalise(event)
        elif isinstance(event, TurnDiscarded):
            self._cancel_speculation(event.turn)
            self._finalised_through = max(self._finalised_through, event.turn)
            self._observe(TurnDropped(self.leg, event.turn, "too-short"))

    def _ask_end_of_turn(self, event: EndOfTurnQuery) -> None:
        if self._end_of_turn is None or self.closed:
            return  # no model: the detector ends the turn at semantic_max_silence_ms
        if self._history is not None:
            # a wideband leg: the 16 kHz audio as it came
            audio = self._history.slice(2 * event.start_sample, 2 * event.end_sample).astype(np.float32)
            audio *= np.float32(1.0 / 32768.0)
        else:
            # the model needs 16 kHz; a turn under 8 s shares its start with the speculative final
            # just resampled, so only the pause since is new
            audio = self._upsampled(event.turn, event.start_sample, event.audio)
        task = asyncio.create_task(self._end_of_turn_answer(event, audio))
        self._queries.add(task)
        task.add_done_callback(self._queries.discard)

    async def _end_of_turn_answer(self, event: EndOfTurnQuery, audio: np.ndarray) -> None:
        assert self._end_of_turn is not None
        try:
            probability = await self._end_of_turn(audio)
            events = self._detector.answer(event.query, probability)
        except asyncio.CancelledError:
            raise
        except Exception:
            # never lose a turn over the model: it ends at semantic_max_silence_ms instead
            if not self._end_of_turn_failed:
                self._end_of_turn_failed = True
                log.exception("end-of-turn model failed for %s; a turn it does not answer for ends "
                              "after semantic_max_silence_ms (logged once per leg)", self.key)
            else:
                log.debug("end-of-turn model failed again for %s", self.key, exc_info=True)
            return
        log.debug("%s turn %d: P(complete) %.3f%s", self.key, event.turn, probability,
                  ", ends it" if events else "")
        for turn_event in events:
            self._handle(turn_event)

    def _speculation_heard(self, event: TurnEnding, task: asyncio.Task[TranscriptionResult]) -> None:
        """A speculative final's transcript is in: the semantic policy's second signal."""
        if self.closed or task.cancelled() or not self._detector.awaits_text(event.turn, event.end_sample):
            return
        result = None if task.exception() is not None else task.result()
        events = self._detector.transcript(event.turn, event.end_sample, None if result is None else result.text)
        reason = self._detector.text_unfinished
        if events or reason:
            log.debug("%s turn %d: text %s", self.key, event.turn,
                      "ends it" if events else f"reads unfinished ({reason}), keeps it open")
        for turn_event in events:
            self._handle(turn_event)

    def _cancel_speculation(self, turn: int) -> None:
        spec = self._speculations.pop(turn, None)
        if spec is not None:
            spec.task.cancel()

    def _seq(self, turn: int) -> int:
        seq = self._seq_of.get(turn)
        if seq is None:
            seq = self._seq_of[turn] = self._next_seq
            self._next_seq += 1
        return seq

    def _speech_end_time(self, end_sample: int) -> float:
        """Monotonic arrival time of the chunk holding the last speech sample."""
        pad = self._config.pad_after_ms * SAMPLE_RATE // 1000
        speech_end = max(0, end_sample - pad - 1)
        index = speech_end // CHUNK
        base = self._processed - len(self._arrivals)
        # the chunk arrived with its last sample: step back to the speech end inside it
        after = ((index + 1) * CHUNK - speech_end) / SAMPLE_RATE
        if base <= index < self._processed:
            return self._arrivals[index - base] - after
        return self._arrivals[-1] if self._arrivals else self._clock()

    def _finalise(self, event: TurnFinal, speech_end: float | None = None) -> None:
        spec = self._speculations.pop(event.turn, None)
        speculative = (
            spec is not None
            and spec.start_sample == event.start_sample
            and spec.end_sample == event.end_sample
            and not spec.task.cancelled()
        )
        if speculative:
            assert spec is not None
            task = spec.task
        else:
            if spec is not None:
                spec.task.cancel()
            task = asyncio.create_task(self._transcribe(event, "final", after=self._final_chain))
        self._finalised_through = max(self._finalised_through, event.turn)
        seq = self._seq(event.turn)
        if speech_end is None:
            speech_end = self._speech_end_time(event.end_sample)
        previous = self._final_chain
        self._final_chain = asyncio.create_task(
            self._publish_final(event, seq, task, previous, speech_end, speculative))

    async def _publish_final(
        self,
        event: TurnFinal,
        seq: int,
        task: asyncio.Task[TranscriptionResult],
        previous: asyncio.Task[None] | None,
        speech_end: float,
        speculative: bool,
    ) -> None:
        result: TranscriptionResult | None
        error = ""
        try:
            result = await task
        except asyncio.CancelledError:
            raise
        except TranscriptionError as exc:
            log.warning("no transcript for %s turn %d: %s (%s)", self.key, seq, exc.code, exc)
            result, error = None, exc.code
        except Exception:
            log.exception("ASR failed for %s turn %d", self.key, seq)
            result, error = None, "asr-failed"
        if previous is not None:
            try:
                await previous
            except Exception:
                pass
        self._remember(event.turn, result)
        if self._on_final is not None:
            self._on_final(event.reason, result, error)
        text = result.text.strip() if result is not None else ""
        if not text and not error and not self._partials_published.get(event.turn):
            self._observe(TurnDropped(self.leg, event.turn, "no-speech"))
            return  # no words in this turn and nothing said about it yet: publish nothing
        origin = self._origin_ms()
        data = {
            "turn": seq,
            "start_ms": round(origin + event.start_sample * 1000 / SAMPLE_RATE),
            "end_ms": round(origin + event.end_sample * 1000 / SAMPLE_RATE),
            "text": text,
            "reason": event.reason,
            "partials": self._partials_published.get(event.turn, 0),
        }
        if result is not None:
            data.update(_result_fields(result))
            data["asr"]["speculative"] = speculative
        else:
            data["error"] = error
        pending = _Pending(data, event.turn, speech_end)
        if self._redactor is None:
            self._emit_final(pending)
            return
        for release in self._redactor.final(text, self._clock(), pending):
            self._emit_final(release.item, release)
        if self._redactor.holding and (self._turn_open or self._finalised_through > event.turn):
            self._redactor.speech(self._clock())  # the next turn is already under way: wait for its final
        self._arm_redaction()

    def _emit_final(self, pending: "_Pending", release: "Release[_Pending] | None" = None) -> None:
        data = pending.data
        if release is not None:
            data = {**data, "text": release.text, "redactions": release.count}
        final = self._events.make(TURN_FINAL, {**data, **self.identity}, leg=self.leg,
                                  speech_end_monotonic=pending.speech_end)
        self._publish(final)
        self.turns_published += 1
        self._observe(TurnPublished(self.leg, pending.turn, final))

    def _arm_redaction(self) -> None:
        """A timer for the redactor's held finals (they go out when it fires, redacted as they stand)."""
        if self._redaction_timer is not None:
            self._redaction_timer.cancel()
            self._redaction_timer = None
        deadline = self._redactor.deadline if self._redactor is not None else None
        if deadline is not None and not self.closed:
            delay = max(0.0, deadline - self._clock())
            self._redaction_timer = asyncio.get_running_loop().call_later(delay, self._redaction_due)

    def _redaction_due(self) -> None:
        self._redaction_timer = None
        if self._redactor is None:
            return
        for release in self._redactor.due(self._clock()):
            self._emit_final(release.item, release)
        self._arm_redaction()

    def _start_partial(self, event: PartialDue) -> None:
        if self._final_chain is not None and not self._final_chain.done():
            return  # a final is still pending: a partial now would overtake it
        task = asyncio.create_task(self._publish_partial(event))
        self._partial_tasks.add(task)
        task.add_done_callback(self._partial_tasks.discard)

    async def _publish_partial(self, event: PartialDue) -> None:
        try:
            result = await self._transcribe(event, "partial")
        except (Superseded, TranscriberClosed, TranscriptionError, asyncio.CancelledError):
            return
        except Exception:
            log.exception("partial ASR failed for %s", self.key)
            return
        if event.turn <= self._finalised_through or self.closed:
            return  # its final was decided meanwhile
        if self._final_chain is not None and not self._final_chain.done():
            return
        text = result.text.strip()
        if not text:
            return
        redactions = None
        if self._redactor is not None:
            redacted = self._redactor.partial(text, self._clock())
            if redacted is None:
                return  # it might be the start of a card number, or a final is held: never out unredacted
            text, redactions = redacted.text, redacted.count
        count = self._partials_published.get(event.turn, 0) + 1
        self._partials_published[event.turn] = count
        origin = self._origin_ms()
        data = {
            "turn": self._seq(event.turn),
            "start_ms": round(origin + event.start_sample * 1000 / SAMPLE_RATE),
            "end_ms": round(origin + event.end_sample * 1000 / SAMPLE_RATE),
            "text": text,
            "partial": count,
        }
        if redactions is not None:
            data["redactions"] = redactions
        data.update(_result_fields(result))
        partial = self._events.make(TURN_PARTIAL, {**data, **self.identity}, leg=self.leg)
        self._publish(partial)
        self._observe(TurnPublished(self.leg, event.turn, partial))

    async def _transcribe(
        self, event: PartialDue | TurnEnding | TurnFinal, kind: str, after: asyncio.Task[None] | None = None
    ) -> TranscriptionResult:
        """``after``: the publication of the previous final, whose text is this turn's context.

        Resampling happens first (the turn's audio is fixed), then the wait:
        ``asyncio.wait`` neither raises the previous turn's error nor cancels
        it when this (speculative) request is cancelled.
        """
        timeout = self._final_timeout_s if kind == "final" else self._partial_timeout_s
        deadline = self._wall() + timeout if timeout else None  # from now: the end of the turn (or the partial)
        if self._history is not None:
            # a wideband leg: the 16 kHz audio as it came, turn bounds doubled
            samples = self._history.slice(2 * event.start_sample, 2 * event.end_sample).astype(np.float32)
            samples *= np.float32(1.0 / 32768.0)
            if kind == "final":
                self._turn_audio[event.turn] = _Context("", samples, _NO_PCM)
        elif kind == "final":
            # the whole turn at once: exactly what a pool worker rebuilds from the 8 kHz source
            samples = upsample_8k_to_16k(event.audio, method=self._resampler)
            self._resampled = _Resampled(event.turn, event.start_sample, event.audio.size, samples)
            self._turn_audio[event.turn] = _Context("", samples, event.audio)
        else:
            samples = self._upsampled(event.turn, event.start_sample, event.audio)
        if self._use_context and after is not None and not after.done():
            await asyncio.wait((after,))
        request = TranscriptionRequest(audio=samples, kind=kind, language=self._language,  # type: ignore[arg-type]
                                       key=self.key, session=self.session, turn=event.turn,
                                       deadline=deadline, **self._context_fields(kind, event.audio))
        return await self._transcriber.transcribe(request)

    def _context_fields(self, kind: str, pcm: np.ndarray) -> dict[str, object]:
        """Request fields carrying the leg's earlier turns: the most recent ones that fit in
        ``context_audio_s`` as audio + transcript (finals only), older ones as the prompt;
        and the 8 kHz source of the turn's and the context's audio."""
        heard: list[_Context] = []
        fields: dict[str, object] = {}
        if self._use_context and self._context:
            entries = list(self._context)
            seconds = 0.0
            if kind == "final":
                while (entries and entries[-1].audio.size
                       and seconds + entries[-1].audio.size / 16000 + CONTEXT_GAP_S <= self._context_audio_s):
                    heard.insert(0, entries.pop())
                    seconds += heard[0].audio.size / 16000 + CONTEXT_GAP_S
            older = [entry.text for entry in entries[-CONTEXT_TURNS:]]
            if older:
                fields["prompt"] = " ".join(older)
        gap = round(CONTEXT_GAP_S * 16000)
        if heard:
            silence = np.zeros(gap, np.float32)
            fields["context_audio"] = np.concatenate([part for entry in heard for part in (entry.audio, silence)])
            fields["context_text"] = " ".join(entry.text for entry in heard)
        if self._history is None:
            fields["source"] = SourceAudio(SAMPLE_RATE, self._resampler, pcm,
                                           tuple(entry.pcm for entry in heard), gap if heard else 0)
        return fields

    def _remember(self, turn: int, result: TranscriptionResult | None) -> None:
        """Keep a final's text and audio as context for the leg's next turns (in turn order)."""
        audio = self._turn_audio.pop(turn, None)
        for older in [t for t in self._turn_audio if t < turn]:  # cancelled speculations
            del self._turn_audio[older]
        if result is None or result.silence or not result.text.strip() or audio is None:
            return
        if result.avg_logprob < CONTEXT_MIN_LOGPROB or result.compression_ratio > CONTEXT_MAX_COMPRESSION:
            return
        self._context.append(_Context(result.text.strip(), audio.audio, audio.pcm))
        # Audio that can no longer be context is dropped (the text stays for the prompt):
        # at most context_audio_s of it is kept per leg.
        seconds = 0.0
        for i in range(len(self._context) - 1, -1, -1):
            entry = self._context[i]
            seconds += entry.audio.size / 16000 + CONTEXT_GAP_S
            if seconds > self._context_audio_s and entry.audio.size:
                self._context[i] = _Context(entry.text, _NO_AUDIO, _NO_PCM)

    def _upsampled(self, turn: int, start_sample: int, audio: np.ndarray) -> np.ndarray:
        """The turn's audio at 16 kHz. Partials and the final of a turn share its start and
        grow at the end, so only the new audio (plus a margin the filter reaches across) is
        resampled: each sample once per turn instead of once per request."""
        cache = self._resampled
        if cache is None or cache.turn != turn or cache.start_sample != start_sample or audio.size < cache.samples:
            out = upsample_8k_to_16k(audio, method=self._resampler)
        else:
            settled = max(0, cache.samples - RESAMPLE_MARGIN)  # outputs before 2*settled are final
            tail_from = max(0, settled - RESAMPLE_MARGIN)  # input history the tail's first outputs need
            tail = upsample_8k_to_16k(audio[tail_from:], method=self._resampler)
            out = np.concatenate((cache.out[: 2 * settled], tail[2 * (settled - tail_from):]))
        self._resampled = _Resampled(turn, start_sample, audio.size, out)
        return out

    # -- end of the leg
    def finish_input(self, now: float) -> None:
        """No more audio will come: pad the trailing partial chunk with silence so
        the last words reach VAD (the caller then drains the VAD runner)."""
        if self._pending:
            padding = CHUNK_BYTES - len(self._pending)
            self.feed_audio(b"\x00" * padding, now)
            self._fed -= padding // 2  # the padding is not audio a manual commit should transcribe

    async def close(self) -> None:
        """Finalise open speech and wait until every final of this leg is published."""
        if self.closed:
            return
        self.closed = True
        if self.manual_turns:
            self.commit(self._clock())  # a client that leaves mid-turn still gets its words published
        for event in self._detector.flush():
            self._handle(event)
        for turn in list(self._speculations):
            self._cancel_speculation(turn)
        for task in list(self._partial_tasks) + list(self._queries):
            task.cancel()
        if self._final_chain is not None:
            try:
                await self._final_chain
            except Exception:
                log.exception("final publication failed for %s", self.key)
        if self._redactor is not None:
            if self._redaction_timer is not None:
                self._redaction_timer.cancel()
                self._redaction_timer = None
            for release in self._redactor.flush(self._clock()):
                self._emit_final(release.item, release)


def _measure(value: float, digits: int) -> float | None:
    """A confidence figure for the event; None (left out) when ASR gave no finite one, which JSON cannot carry."""
    return round(value, digits) if math.isfinite(value) else None


def _result_fields(result: TranscriptionResult) -> dict[str, object]:
    return {
        "language": result.language or None,
        "confidence": {
            "avg_logprob": _measure(result.avg_logprob, 4),
            "no_speech_prob": _measure(result.no_speech_prob, 4),
            "compression_ratio": _measure(result.compression_ratio, 3),
            "language_probability": _measure(result.language_probability, 4),
        },
        "asr": {
            "model": result.model,
            "audio_ms": round(result.audio_seconds * 1000),
            "processing_ms": round(result.processing_seconds * 1000, 1),
        },
    }
