"""The OpenAI Realtime transcription protocol, sans I/O.

:class:`RealtimeConnection` is fed what a client sends on ``/v1/realtime`` (JSON
text messages) and what the session's leg reports (the pipeline's
:data:`~gateway.pipeline.LegObservation`), and returns what to do about it: server
events to send (:class:`ServerEvent`) and actions for the edge to carry out on the
Earshot session (:class:`OpenSession`, :class:`FeedNarrow`, :class:`FeedWideband`,
:class:`Commit`, :class:`Clear`, :class:`EndSession`). It never touches a socket
or a clock of its own, so every case is a unit test (tests/unit/test_realtime_protocol.py).

Three dialects of the same protocol are spoken:

* OpenAI GA: ``session.update`` with ``session.type: "transcription"`` and the
  ``audio.input`` block; ``session.created`` / ``session.updated``.
* OpenAI beta (header ``OpenAI-Beta: realtime=v1``): ``transcription_session.update``
  with ``input_audio_format`` / ``input_audio_transcription`` / ``turn_detection``;
  ``transcription_session.created`` / ``transcription_session.updated``.
* Together AI: ``?model=...&input_audio_format=pcm_s16le_16000`` plus VAD parameters
  in the query string; its deltas carry the whole current text of the segment.

Either update event is accepted in every dialect; the reply follows the event sent.

Why the Earshot session opens on the first audio rather than on connect: clients
send ``session.update`` right after ``session.created``, and what it sets (audio
format, turn detection, language) is fixed for the life of an Earshot session.
When an update changes one of those after audio has flowed, or a client commits
while server VAD is on, the current Earshot session is ended (what was said is
finalised and published) and the next audio opens a new one: a *generation*.
Every generation carries the same Realtime ``session_id`` in its source, and item
ids and audio offsets continue across generations, so the client sees one session.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Union

import numpy as np

from ...media import g711
from ...media.turn import MIN_MAX_TURN_S, TurnConfig
from ...media.wideband import StreamResampler
from ...pipeline import LegObservation, SpeechStarted, SpeechStopped, TurnDropped, TurnEndHeard, TurnPublished

__all__ = [
    "Action",
    "Clear",
    "Commit",
    "EndSession",
    "FeedNarrow",
    "FeedWideband",
    "LEG",
    "MAX_APPEND_BYTES",
    "MIN_COMMIT_MS",
    "OpenSession",
    "Output",
    "ProtocolError",
    "RealtimeConnection",
    "SEMANTIC_EAGERNESS",
    "ServerEvent",
    "TranscriptionConfig",
    "TurnDetection",
    "session_turn_config",
]

#: The one leg of a Realtime session.
LEG = "caller"
#: Largest ``audio`` field of one append (its base64 text), as OpenAI's 15 MiB event limit.
#: The HTTP server refuses WebSocket messages over 16 MiB outright (close code 1009).
MAX_APPEND_BYTES = 15 * 1024 * 1024
#: A manual commit needs this much audio, as OpenAI's ``input_audio_buffer_commit_empty``.
MIN_COMMIT_MS = 100

# Audio formats, by their GA names; pcm_s16le_16000 is Together AI's.
PCM24 = "audio/pcm"
PCM16K = "pcm_s16le_16000"
PCMU = "audio/pcmu"
PCMA = "audio/pcma"
#: input sample rate and bytes per sample of each format
_FORMAT_RATE = {PCM24: (24000, 2), PCM16K: (16000, 2), PCMU: (8000, 1), PCMA: (8000, 1)}
_G711 = {PCMU: "PCMU", PCMA: "PCMA"}
#: beta (and query-string) names of the formats
_LEGACY_FORMATS = {"pcm16": PCM24, "g711_ulaw": PCMU, "g711_alaw": PCMA, PCM16K: PCM16K}
_LEGACY_NAME = {PCM24: "pcm16", PCMU: "g711_ulaw", PCMA: "g711_alaw", PCM16K: PCM16K}

#: ``semantic_vad`` eagerness -> (semantic_threshold, semantic_max_silence_ms) of Earshot's
#: semantic turn policy (docs/turns.md): at each pause the end-of-turn model is asked, and a
#: P(complete) at or above the threshold ends the turn; else it ends after the longer
#: silence. ``low`` waits for the speaker (a sure answer or a long pause), ``high`` ends
#: turns quickly; ``auto`` is ``medium``, as OpenAI's.
SEMANTIC_EAGERNESS = {"low": (0.7, 2000), "medium": (0.5, 1500), "auto": (0.5, 1500), "high": (0.3, 800)}
MIN_SILENCE_MS = 64  # two VAD chunks: the gateway's own lower bound (config.silence_ms)
MAX_SILENCE_MS = 10_000
MAX_PAD_MS = 2_000
MAX_TURN_S = 120.0

_CONVERSATION_EVENTS = frozenset({
    "response.create", "response.cancel", "conversation.item.create", "conversation.item.delete",
    "conversation.item.truncate", "conversation.item.retrieve", "output_audio_buffer.clear",
})
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")


class ProtocolError(Exception):
    """A client mistake: becomes an ``error`` event; the session stays up."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.type = type


# -- what the client configures ---------------------------------------------------------

@dataclass(frozen=True)
class TurnDetection:
    """``server_vad`` or ``semantic_vad`` as the client set it (None fields: the gateway's own)."""

    type: str = "server_vad"
    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None
    eagerness: str | None = None  # semantic_vad
    min_speech_ms: int | None = None  # Together's min_speech_duration_ms
    max_turn_s: float | None = None  # Together's max_speech_duration_s


@dataclass(frozen=True)
class TranscriptionConfig:
    """A transcription session's configuration, whichever dialect set it."""

    format: str = PCM24
    model: str = ""
    language: str | None = None
    prompt: str = ""
    turn_detection: TurnDetection | None = TurnDetection()
    noise_reduction: Mapping[str, Any] | None = None  # accepted and reported, not applied
    include: tuple[str, ...] = ()

    @property
    def manual(self) -> bool:
        return self.turn_detection is None

    @property
    def wideband(self) -> bool:
        return self.format in (PCM24, PCM16K)

    def media(self) -> tuple[object, ...]:
        """What an open Earshot session cannot change."""
        return (self.format, self.language, self.turn_detection)


def session_turn_config(detection: TurnDetection | None, base: TurnConfig) -> TurnConfig:
    """The Earshot turn settings for a client's turn detection, within TurnConfig's rules.

    ``server_vad`` is the silence policy: ``threshold`` -> ``threshold``,
    ``prefix_padding_ms`` -> ``pad_before_ms``, ``silence_duration_ms`` -> ``silence_ms``;
    the speculative final and the tail padding shrink with a short silence so that
    ``pad_after_ms <= speculative_ms < silence_ms`` still holds. ``semantic_vad`` is the
    semantic policy, its eagerness picking the model's threshold and the longest pause
    (:data:`SEMANTIC_EAGERNESS`); the gateway's ``semantic_min_silence_ms`` (and the tail
    padding) shrink below that pause if need be. Manual turns (``None``) keep the gateway's
    settings: there the VAD ends no turn, but ``max_turn_s`` still bounds one.
    """
    if detection is None:
        return base
    threshold = base.threshold if detection.threshold is None else min(max(detection.threshold, 0.01), 1.0)
    if detection.type == "semantic_vad":
        probability, max_silence = SEMANTIC_EAGERNESS[detection.eagerness or "auto"]
        min_silence = min(base.semantic_min_silence_ms, max_silence - 1)
        return replace(base, policy="semantic", semantic_threshold=probability,
                       semantic_min_silence_ms=min_silence, semantic_max_silence_ms=max_silence,
                       pad_after_ms=min(base.pad_after_ms, min_silence))
    if detection.silence_duration_ms is not None:
        silence = detection.silence_duration_ms
    else:
        silence = base.silence_ms
    silence = min(max(silence, MIN_SILENCE_MS), MAX_SILENCE_MS)
    pad_before = base.pad_before_ms if detection.prefix_padding_ms is None else min(detection.prefix_padding_ms,
                                                                                    MAX_PAD_MS)
    speculative = min(base.speculative_ms, silence - 1)
    pad_after = min(base.pad_after_ms, speculative)
    neg = base.neg_threshold if base.neg_threshold is not None and base.neg_threshold <= threshold else None
    min_speech = base.min_speech_ms if detection.min_speech_ms is None else min(detection.min_speech_ms, 10_000)
    max_turn = base.max_turn_s
    if detection.max_turn_s is not None:
        max_turn = min(max(detection.max_turn_s, MIN_MAX_TURN_S + 0.5), MAX_TURN_S)
    return replace(base, threshold=threshold, neg_threshold=neg, silence_ms=silence, pad_before_ms=pad_before,
                   speculative_ms=speculative, pad_after_ms=pad_after, min_speech_ms=min_speech,
                   max_turn_s=max_turn, policy="silence")


# -- what goes out -------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerEvent:
    """One server event; :meth:`to_wire` is what the client receives."""

    type: str
    event_id: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "event_id": self.event_id, **self.fields}

    def to_json(self) -> str:
        return json.dumps(self.to_wire(), separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class OpenSession:
    """Open the Earshot session of ``generation``: one leg, :data:`LEG`."""

    generation: int
    wideband: bool  # fed 16 kHz (FeedWideband) rather than 8 kHz (FeedNarrow)
    manual_turns: bool
    language: str | None
    turn_config: TurnConfig
    config: TranscriptionConfig


@dataclass(frozen=True)
class FeedNarrow:
    generation: int
    pcm: bytes  # 16-bit 8 kHz PCM (decoded G.711): Session.feed
    now: float


@dataclass(frozen=True, eq=False)
class FeedWideband:
    generation: int
    samples: np.ndarray  # 16 kHz int16: Session.feed_wideband
    now: float


@dataclass(frozen=True)
class Commit:
    """Manual turns: ``Session.commit``; hand its result to :meth:`RealtimeConnection.committed`."""

    generation: int
    now: float


@dataclass(frozen=True)
class EndTurn:
    """Server VAD: ``Session.end_turn`` (a client commit); a TurnEndHeard observation follows."""

    generation: int


@dataclass(frozen=True)
class Clear:
    generation: int


@dataclass(frozen=True)
class EndSession:
    """``Session.end(reason)``: its open speech is finalised and published."""

    generation: int
    reason: str


Action = Union[OpenSession, FeedNarrow, FeedWideband, Commit, EndTurn, Clear, EndSession]
Output = Union[ServerEvent, Action]


# -- connection state ---------------------------------------------------------------------

@dataclass
class _Item:
    id: str
    start_ms: int = 0
    end_ms: int | None = None
    sent: str = ""  # text already sent as deltas
    stopped: bool = False
    committed: bool = False
    done: bool = False


@dataclass
class _Generation:
    index: int
    config: TranscriptionConfig
    base_ms: float  # audio (ms) appended before this generation
    opened: bool = False
    ended: bool = False
    samples: int = 0  # input samples appended in this generation
    pending: int = 0  # manual turns: input samples since the last commit or clear
    carry: bytes = b""  # an odd byte of 16-bit PCM, until its pair arrives
    resampler: StreamResampler | None = None
    items: dict[int, _Item] = field(default_factory=dict)  # leg turn -> item

    @property
    def rate(self) -> int:
        return _FORMAT_RATE[self.config.format][0]

    @property
    def ms(self) -> float:
        return self.samples * 1000 / self.rate


def _random_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class RealtimeConnection:
    """One ``/v1/realtime`` connection: call :meth:`start`, then :meth:`receive` each message,
    :meth:`observe` each leg observation, :meth:`committed` after each :class:`Commit`, and
    :meth:`close` when the client goes."""

    def __init__(self, *, session_id: str, base_turn: TurnConfig | None = None,
                 query: Mapping[str, str] | None = None, beta: bool = False, model_name: str = "",
                 ids: Callable[[str], str] = _random_id, clock: Callable[[], float] = time.time,
                 session_ttl_s: int = 1800) -> None:
        self.session_id = session_id
        self.base_turn = base_turn or TurnConfig()
        self.model_name = model_name
        self._ids = ids
        self._clock = clock
        self._ttl = session_ttl_s
        query = dict(query or {})
        self.together = query.get("input_audio_format") == PCM16K
        self.flavor = "together" if self.together else "beta" if beta else "ga"
        config, self._query_errors = _config_from_query(query, TranscriptionConfig(model=query.get("model", "")))
        self.config = config
        self._gen = _Generation(0, config, 0.0)
        self._generations: dict[int, _Generation] = {0: self._gen}
        self._last_committed: str | None = None
        self.closed = False

    # -- public API -------------------------------------------------------------------
    def start(self) -> list[ServerEvent]:
        """``session.created`` (``transcription_session.created`` in the beta dialect), then an
        ``error`` for each query parameter that could not be used."""
        kind = "transcription_session.created" if self.flavor == "beta" else "session.created"
        shape = "ga" if self.flavor == "ga" else "legacy"
        out = [self._event(kind, session=self._session_object(shape))]
        out += [self._error(exc) for exc in self._query_errors]
        return out

    def receive(self, message: str | bytes, now: float) -> list[Output]:
        """One client message -> what to send and do, in order."""
        if self.closed:
            return []
        if not isinstance(message, str):
            return [self._error(ProtocolError(
                "invalid_event", "binary messages are not part of the protocol: send audio as base64 in "
                "an input_audio_buffer.append event"))]
        try:
            event = json.loads(message)
        except (ValueError, RecursionError) as exc:
            return [self._error(ProtocolError("invalid_json", f"the message is not valid JSON: {exc}"))]
        if not isinstance(event, dict):
            return [self._error(ProtocolError("invalid_event", "an event must be a JSON object"))]
        client_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        kind = event.get("type")
        try:
            if not isinstance(kind, str) or not kind:
                raise ProtocolError("missing_required_parameter", "the event has no 'type'", "type")
            handler = self._handlers.get(kind)
            if handler is None:
                if kind in _CONVERSATION_EVENTS:
                    raise ProtocolError("invalid_value", f"'{kind}' is not available in a transcription session "
                                        "(Earshot transcribes; it does not generate responses)", "type")
                raise ProtocolError("invalid_value", f"unknown event type '{kind}'; supported: "
                                    + ", ".join(sorted(self._handlers)), "type")
            return handler(self, event, now)
        except ProtocolError as exc:
            return [self._error(exc, client_id)]

    def observe(self, observation: LegObservation, generation: int) -> list[ServerEvent]:
        """A leg observation of the Earshot session of ``generation`` -> server events."""
        gen = self._generations.get(generation)
        if gen is None or self.closed:
            return []
        if isinstance(observation, SpeechStarted):
            item = self._item(gen, observation.turn)
            item.start_ms = round(gen.base_ms + observation.audio_start_ms)
            return [self._event("input_audio_buffer.speech_started", audio_start_ms=item.start_ms, item_id=item.id)]
        if isinstance(observation, SpeechStopped):
            gen.pending = 0  # the server committed the buffer
            item = self._item(gen, observation.turn)
            return self._stop(item, round(gen.base_ms + observation.audio_end_ms))
        if isinstance(observation, TurnEndHeard):
            if observation.turn is not None:
                return []  # the turn it ended was reported as stopped (or dropped) just before
            # the committed audio held no open turn: an item with an empty transcript, as OpenAI's
            item = _Item(self._ids("item"), start_ms=round(gen.base_ms + gen.ms))
            item.stopped = True
            return self._complete(item, "", {"text": ""})
        if isinstance(observation, TurnPublished):
            return self._published(gen, observation)
        if isinstance(observation, TurnDropped):
            item = gen.items.get(observation.turn)
            if item is None or item.done:
                return []
            if observation.reason == "cleared":
                item.done = True  # the client threw that audio away: nothing more about it
                return []
            out: list[ServerEvent] = []
            if not item.stopped:  # too short a burst: VAD opened a turn, then found no speech in it
                out += self._stop(item, round(gen.base_ms + gen.ms))
            out += self._complete(item, "", {"text": ""})
            return out
        return []

    def committed(self, generation: int, turn: int | None) -> list[ServerEvent]:
        """The result of a :class:`Commit` (``Session.commit``'s turn index, or None)."""
        gen = self._generations.get(generation)
        if gen is None or self.closed:
            return []
        if turn is None:
            return [self._error(ProtocolError("input_audio_buffer_commit_empty",
                                              "Error committing input audio buffer: the buffer is empty."))]
        start_ms = round(gen.base_ms + gen.ms - gen.pending * 1000 / gen.rate)
        gen.pending = 0
        item = self._item(gen, turn)
        item.start_ms = start_ms
        item.stopped = True
        return self._commit(item)

    def close(self, now: float, reason: str = "client-closed") -> list[Action]:
        """The client went: end the open Earshot session (its speech is still finalised and
        published). Observations after this produce nothing."""
        out = self._end_generation(reason, now)
        self.closed = True
        return out

    def error_event(self, code: str, message: str, *, type: str = "invalid_request_error",
                    param: str | None = None) -> ServerEvent:
        """An ``error`` for the edge's own refusals (authentication, limits)."""
        return self._error(ProtocolError(code, message, param, type))

    @property
    def generation(self) -> int:
        return self._gen.index

    # -- client events ----------------------------------------------------------------
    def _on_session_update(self, event: dict[str, Any], now: float) -> list[Output]:
        session = _session_field(event)
        legacy = "type" not in session and any(key in session for key in _LEGACY_KEYS)
        config = _parse_legacy(session, self.config) if legacy else _parse_ga(session, self.config)
        out = self._apply(config, now)
        out.append(self._event("session.updated", session=self._session_object("legacy" if legacy else "ga")))
        return out

    def _on_transcription_session_update(self, event: dict[str, Any], now: float) -> list[Output]:
        config = _parse_legacy(_session_field(event), self.config)
        out = self._apply(config, now)
        out.append(self._event("transcription_session.updated", session=self._session_object("legacy")))
        return out

    def _on_append(self, event: dict[str, Any], now: float) -> list[Output]:
        audio = event.get("audio")
        if audio is None:
            raise ProtocolError("missing_required_parameter", "input_audio_buffer.append needs 'audio'", "audio")
        if not isinstance(audio, str):
            raise ProtocolError("invalid_type", "'audio' must be a base64 string", "audio")
        if len(audio) > MAX_APPEND_BYTES:
            raise ProtocolError("input_audio_buffer_append_too_large",
                                f"'audio' is {len(audio)} bytes of base64; one append takes at most "
                                f"{MAX_APPEND_BYTES} (send smaller pieces)", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_base64", "'audio' is not valid base64", "audio") from None
        if not data:
            return []
        gen = self._gen
        out: list[Output] = []
        if not gen.opened:
            gen.opened = True
            cfg = gen.config
            out.append(OpenSession(gen.index, cfg.wideband, cfg.manual, cfg.language,
                                   session_turn_config(cfg.turn_detection, self.base_turn), cfg))
        fmt = gen.config.format
        if fmt in _G711:
            gen.samples += len(data)
            gen.pending += len(data)
            out.append(FeedNarrow(gen.index, g711.decode(data, _G711[fmt]), now))
            return out
        data = gen.carry + data
        whole = len(data) - len(data) % 2
        gen.carry = data[whole:]
        if not whole:
            return out
        gen.samples += whole // 2
        gen.pending += whole // 2
        if fmt == PCM16K:
            samples = np.frombuffer(data[:whole], dtype="<i2").astype(np.int16)
        else:
            if gen.resampler is None:
                gen.resampler = StreamResampler(24000)
            samples = gen.resampler.feed(data[:whole])
        if samples.size:
            out.append(FeedWideband(gen.index, samples, now))
        return out

    def _on_commit(self, event: dict[str, Any], now: float) -> list[Output]:
        gen = self._gen
        if gen.config.manual:
            pending_ms = gen.pending * 1000 / gen.rate
            if pending_ms < MIN_COMMIT_MS:
                raise ProtocolError(
                    "input_audio_buffer_commit_empty",
                    f"Error committing input audio buffer: buffer too small. Expected at least {MIN_COMMIT_MS}ms "
                    f"of audio, but buffer only has {pending_ms:.2f}ms of audio.")
            return [Commit(gen.index, now)]
        # Server VAD ends turns itself; a client commit means "transcribe what I sent, now"
        # (Together's clients send one at the end of a file): the leg ends its open turn right
        # after the audio appended so far (reason commit) and says so with TurnEndHeard.
        if not gen.opened or gen.pending == 0:
            raise ProtocolError("input_audio_buffer_commit_empty",
                                "Error committing input audio buffer: no audio has been appended since the "
                                "last commit.")
        gen.pending = 0
        return [EndTurn(gen.index)]

    def _on_clear(self, event: dict[str, Any], now: float) -> list[Output]:
        gen = self._gen
        out: list[Output] = []
        if gen.opened:
            out.append(Clear(gen.index))
        gen.pending = 0
        out.append(self._event("input_audio_buffer.cleared"))
        return out

    _handlers: dict[str, Callable[["RealtimeConnection", dict[str, Any], float], list[Output]]] = {
        "session.update": _on_session_update,
        "transcription_session.update": _on_transcription_session_update,
        "transcription_session.updated": _on_transcription_session_update,  # Together's name for it
        "input_audio_buffer.append": _on_append,
        "input_audio_buffer.commit": _on_commit,
        "input_audio_buffer.clear": _on_clear,
    }

    # -- helpers ----------------------------------------------------------------------
    def _apply(self, config: TranscriptionConfig, now: float) -> list[Output]:
        """Adopt ``config``; an open Earshot session that cannot take it ends here."""
        out: list[Output] = []
        if self._gen.opened and config.media() != self._gen.config.media():
            out += self._end_generation("session-update", now)
        self.config = config
        if not self._gen.opened:
            self._gen.config = config
        return out

    def _end_generation(self, reason: str, now: float) -> list[Action]:
        gen = self._gen
        if not gen.opened or gen.ended or self.closed:
            return []
        gen.ended = True
        out: list[Action] = []
        if gen.resampler is not None:
            tail = gen.resampler.flush()
            if tail.size:
                out.append(FeedWideband(gen.index, tail, now))
        out.append(EndSession(gen.index, reason))
        nxt = _Generation(gen.index + 1, self.config, gen.base_ms + gen.ms)
        self._generations[nxt.index] = nxt
        self._gen = nxt
        return out

    def _item(self, gen: _Generation, turn: int) -> _Item:
        item = gen.items.get(turn)
        if item is None:
            item = gen.items[turn] = _Item(self._ids("item"), start_ms=round(gen.base_ms + gen.ms))
        return item

    def _stop(self, item: _Item, end_ms: int) -> list[ServerEvent]:
        if item.stopped:
            return []
        item.stopped = True
        item.end_ms = end_ms
        return [self._event("input_audio_buffer.speech_stopped", audio_end_ms=end_ms, item_id=item.id),
                *self._commit(item)]

    def _commit(self, item: _Item) -> list[ServerEvent]:
        if item.committed:
            return []
        item.committed = True
        previous, self._last_committed = self._last_committed, item.id
        return [self._event("input_audio_buffer.committed", previous_item_id=previous, item_id=item.id)]

    def _published(self, gen: _Generation, observation: TurnPublished) -> list[ServerEvent]:
        event = observation.event
        data = event.data
        text = str(data.get("text") or "")
        if event.type == "turn.partial":
            item = gen.items.get(observation.turn)
            if item is None or item.done or not text:
                return []
            return self._delta(item, text)
        if event.type != "turn.final":
            return []
        item = self._item(gen, observation.turn)
        if item.done:
            return []
        out = self._commit(item)  # a turn the leg ended by itself (max length) arrives uncommitted
        if data.get("error"):
            item.done = True
            out.append(self._event("conversation.item.input_audio_transcription.failed", item_id=item.id,
                                   content_index=0, error={
                                       "type": "transcription_error",
                                       "code": str(data["error"]),
                                       "message": f"transcription failed: {data['error']}",
                                       "param": None,
                                   }))
            return out
        out += self._complete(item, text, data)
        return out

    def _delta(self, item: _Item, text: str) -> list[ServerEvent]:
        """Whole re-transcriptions -> OpenAI deltas: the text that extends what was sent; none when
        the new text revises earlier words. Together's deltas are the whole current text."""
        if self.together:
            if text == item.sent:
                return []
            item.sent = text
            return [self._event("conversation.item.input_audio_transcription.delta", item_id=item.id,
                                content_index=0, delta=text)]
        if not text.startswith(item.sent) or len(text) == len(item.sent):
            return []
        delta = text[len(item.sent):]
        item.sent = text
        return [self._event("conversation.item.input_audio_transcription.delta", item_id=item.id,
                            content_index=0, delta=delta)]

    def _complete(self, item: _Item, text: str, data: Mapping[str, Any]) -> list[ServerEvent]:
        out = list(self._commit(item))
        if text:
            out += self._delta(item, text)
        item.done = True
        start, end = data.get("start_ms"), data.get("end_ms")
        seconds = (end - start) / 1000 if isinstance(start, int) and isinstance(end, int) else 0.0
        out.append(self._event("conversation.item.input_audio_transcription.completed", item_id=item.id,
                               content_index=0, transcript=text,
                               usage={"type": "duration", "seconds": round(max(seconds, 0.0), 3)}))
        return out

    def _event(self, kind: str, **fields: Any) -> ServerEvent:
        return ServerEvent(kind, self._ids("event"), fields)

    def _error(self, exc: ProtocolError, client_event_id: str | None = None) -> ServerEvent:
        return self._event("error", error={"type": exc.type, "code": exc.code, "message": exc.message,
                                           "param": exc.param, "event_id": client_event_id})

    def _session_object(self, shape: str) -> dict[str, Any]:
        cfg = self.config
        model = cfg.model or self.model_name
        detection = _detection_object(cfg.turn_detection, self.base_turn)
        transcription = {"model": model, "language": cfg.language, "prompt": cfg.prompt}
        if shape == "ga":
            rate = _FORMAT_RATE[cfg.format][0]
            fmt: dict[str, Any] = {"type": PCM24, "rate": rate} if cfg.format in (PCM24, PCM16K) else {"type": cfg.format}
            return {
                "type": "transcription",
                "object": "realtime.transcription_session",
                "id": self.session_id,
                "expires_at": int(self._clock()) + self._ttl,
                "audio": {"input": {"format": fmt, "transcription": transcription,
                                    "noise_reduction": _plain(cfg.noise_reduction), "turn_detection": detection}},
                "include": list(cfg.include),
            }
        body = {
            "id": self.session_id,
            "object": "realtime.transcription_session",
            "expires_at": int(self._clock()) + self._ttl,
            "modalities": ["text"],
            "input_audio_format": _LEGACY_NAME[cfg.format],
            "input_audio_transcription": transcription,
            "turn_detection": detection,
            "input_audio_noise_reduction": _plain(cfg.noise_reduction),
            "include": list(cfg.include),
        }
        if self.together:
            body["model"] = model
        return body


# -- parsing ------------------------------------------------------------------------------

_LEGACY_KEYS = ("input_audio_format", "input_audio_transcription", "turn_detection", "input_audio_noise_reduction")


def _plain(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return dict(value) if value is not None else None


def _session_field(event: dict[str, Any]) -> dict[str, Any]:
    session = event.get("session")
    if session is None:
        raise ProtocolError("missing_required_parameter", f"{event['type']} needs 'session'", "session")
    if not isinstance(session, dict):
        raise ProtocolError("invalid_type", "'session' must be an object", "session")
    return session


def _object(parent: Mapping[str, Any], key: str, param: str) -> dict[str, Any] | None:
    value = parent.get(key)
    if value is not None and not isinstance(value, dict):
        raise ProtocolError("invalid_type", f"'{param}' must be an object", param)
    return value


def _number(value: Any, param: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ProtocolError("invalid_value", f"'{param}' must be a number from {lo:g} to {hi:g}, got {value!r}",
                            param)
    return float(value)


def _integer(value: Any, param: str, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError("invalid_value", f"'{param}' must be an integer from {lo} to {hi}, got {value!r}", param)
    return value


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError("invalid_type", f"'{param}' must be a string", param)
    return value


def _language(value: Any, param: str) -> str | None:
    if value is None or value == "":
        return None
    value = _string(value, param)
    if value.lower() == "auto":
        return None
    if not _LANGUAGE.match(value):
        raise ProtocolError("invalid_value", f"'{param}' must be an ISO-639-1 language code such as 'en', "
                            f"got {value!r}", param)
    return re.split(r"[-_]", value)[0].lower()  # Whisper takes the language, not the region


def _ga_format(value: Any, param: str) -> str:
    if not isinstance(value, dict):
        raise ProtocolError("invalid_type", f"'{param}' must be an object such as "
                            '{"type": "audio/pcm", "rate": 24000}', param)
    kind = value.get("type", PCM24)
    if kind == PCM24:
        rate = value.get("rate", 24000)
        if rate == 16000 and value.get("type") == PCM24:
            return PCM16K  # an extension: the 16 kHz PCM Together's clients send
        if rate != 24000:
            raise ProtocolError("invalid_value", f"audio/pcm is taken at 24000 Hz only, got rate {rate!r}",
                                f"{param}.rate")
        return PCM24
    if kind in (PCMU, PCMA):
        return kind
    raise ProtocolError("invalid_value", f"unsupported audio format {kind!r}; supported: audio/pcm (24 kHz), "
                        "audio/pcmu, audio/pcma", f"{param}.type")


def _legacy_format(value: Any, param: str) -> str:
    if not isinstance(value, str) or value not in _LEGACY_FORMATS:  # a list or object is unhashable
        raise ProtocolError("invalid_value", f"unsupported input_audio_format {value!r}; supported: "
                            + ", ".join(_LEGACY_FORMATS), param)
    return _LEGACY_FORMATS[value]


def _transcription(value: Any, param: str) -> dict[str, Any]:
    """model / language / prompt; null resets them (Earshot always transcribes)."""
    if value is None:
        return {"model": "", "language": None, "prompt": ""}
    if not isinstance(value, dict):
        raise ProtocolError("invalid_type", f"'{param}' must be an object", param)
    changes: dict[str, Any] = {}
    if value.get("model") is not None:
        changes["model"] = _string(value["model"], f"{param}.model")
    if "language" in value:
        changes["language"] = _language(value["language"], f"{param}.language")
    if value.get("prompt") is not None:
        changes["prompt"] = _string(value["prompt"], f"{param}.prompt")
    return changes


def _turn_detection(value: Any, param: str) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("invalid_type", f"'{param}' must be an object or null", param)
    kind = value.get("type", "server_vad")
    if kind == "semantic_vad":
        eagerness = value.get("eagerness", "auto")
        if not isinstance(eagerness, str) or eagerness not in SEMANTIC_EAGERNESS:
            raise ProtocolError("invalid_value", f"'{param}.eagerness' must be one of low, medium, high, auto, "
                                f"got {eagerness!r}", f"{param}.eagerness")
        return TurnDetection("semantic_vad", eagerness=eagerness)
    if kind != "server_vad":
        raise ProtocolError("invalid_value", f"unsupported turn detection {kind!r}; supported: server_vad, "
                            "semantic_vad, or null for manual commits", f"{param}.type")
    fields: dict[str, Any] = {}
    if value.get("threshold") is not None:
        fields["threshold"] = _number(value["threshold"], f"{param}.threshold", 0.0, 1.0)
    for name in ("prefix_padding_ms", "speech_pad_ms"):  # OpenAI's name, Together's
        if value.get(name) is not None:
            fields["prefix_padding_ms"] = _integer(value[name], f"{param}.{name}", 0, 60_000)
    for name in ("silence_duration_ms", "min_silence_duration_ms"):
        if value.get(name) is not None:
            fields["silence_duration_ms"] = _integer(value[name], f"{param}.{name}", 0, 60_000)
    if value.get("min_speech_duration_ms") is not None:
        fields["min_speech_ms"] = _integer(value["min_speech_duration_ms"], f"{param}.min_speech_duration_ms",
                                           0, 60_000)
    if value.get("max_speech_duration_s") is not None:
        fields["max_turn_s"] = _number(value["max_speech_duration_s"], f"{param}.max_speech_duration_s", 0, 3600)
    return TurnDetection("server_vad", **fields)


def _noise_reduction(value: Any, param: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("invalid_type", f"'{param}' must be an object or null", param)
    kind = value.get("type")
    if kind is not None and kind not in ("near_field", "far_field"):
        raise ProtocolError("invalid_value", f"'{param}.type' must be near_field or far_field, got {kind!r}",
                            f"{param}.type")
    return dict(value)


def _include(value: Any, param: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError("invalid_type", f"'{param}' must be a list of strings", param)
    return tuple(value)


def _parse_ga(session: dict[str, Any], current: TranscriptionConfig) -> TranscriptionConfig:
    kind = session.get("type", "transcription")
    if kind != "transcription":
        raise ProtocolError("invalid_value", f"session type {kind!r} is not served here: Earshot runs "
                            "transcription sessions (session.type \"transcription\")", "session.type")
    changes: dict[str, Any] = {}
    audio = _object(session, "audio", "session.audio")
    inp = _object(audio, "input", "session.audio.input") if audio is not None else None
    if inp is not None:
        base = "session.audio.input"
        if "format" in inp:
            changes["format"] = _ga_format(inp["format"], f"{base}.format")
        if "transcription" in inp:
            changes.update(_transcription(inp["transcription"], f"{base}.transcription"))
        if "turn_detection" in inp:
            changes["turn_detection"] = _turn_detection(inp["turn_detection"], f"{base}.turn_detection")
        if "noise_reduction" in inp:
            changes["noise_reduction"] = _noise_reduction(inp["noise_reduction"], f"{base}.noise_reduction")
    if "include" in session:
        changes["include"] = _include(session["include"], "session.include")
    return replace(current, **changes)


def _parse_legacy(session: dict[str, Any], current: TranscriptionConfig) -> TranscriptionConfig:
    changes: dict[str, Any] = {}
    if "input_audio_format" in session:
        changes["format"] = _legacy_format(session["input_audio_format"], "session.input_audio_format")
    if "input_audio_transcription" in session:
        changes.update(_transcription(session["input_audio_transcription"], "session.input_audio_transcription"))
    if "turn_detection" in session:
        changes["turn_detection"] = _turn_detection(session["turn_detection"], "session.turn_detection")
    if "input_audio_noise_reduction" in session:
        changes["noise_reduction"] = _noise_reduction(session["input_audio_noise_reduction"],
                                                      "session.input_audio_noise_reduction")
    if "include" in session:
        changes["include"] = _include(session["include"], "session.include")
    return replace(current, **changes)


#: Together AI's VAD query parameters (and OpenAI's names for the same), as turn_detection keys
_QUERY_VAD = ("threshold", "min_silence_duration_ms", "silence_duration_ms", "speech_pad_ms", "prefix_padding_ms",
              "min_speech_duration_ms", "max_speech_duration_s")


def _config_from_query(query: Mapping[str, str], config: TranscriptionConfig
                       ) -> tuple[TranscriptionConfig, list[ProtocolError]]:
    """``?model=&input_audio_format=&language=`` and VAD parameters; a bad one is reported and skipped."""
    errors: list[ProtocolError] = []

    def attempt(build: Callable[[], dict[str, Any]]) -> None:
        nonlocal config
        try:
            config = replace(config, **build())
        except ProtocolError as exc:
            errors.append(exc)

    if "input_audio_format" in query:
        attempt(lambda: {"format": _legacy_format(query["input_audio_format"], "input_audio_format")})
    if "language" in query:
        attempt(lambda: {"language": _language(query["language"], "language")})
    mode = query.get("turn_detection")
    if mode is not None and mode.lower() in ("none", "null", ""):
        config = replace(config, turn_detection=None)
        return config, errors
    vad: dict[str, Any] = {}
    if mode is not None:
        vad["type"] = mode
    if "eagerness" in query:
        vad["eagerness"] = query["eagerness"]
    for name in _QUERY_VAD:
        if name in query:
            try:
                vad[name] = float(query[name]) if name in ("threshold", "max_speech_duration_s") else int(query[name])
            except ValueError:
                errors.append(ProtocolError("invalid_value", f"query parameter '{name}' must be a number, got "
                                            f"{query[name]!r}", name))
    if vad:
        def detection() -> dict[str, Any]:
            try:
                return {"turn_detection": _turn_detection(vad, "turn_detection")}
            except ProtocolError as exc:  # name the query parameter, not a JSON path
                raise ProtocolError(exc.code, exc.message, (exc.param or "").removeprefix("turn_detection.")
                                    or "turn_detection") from None
        attempt(detection)
    return config, errors


def _detection_object(detection: TurnDetection | None, base: TurnConfig) -> dict[str, Any] | None:
    """turn_detection as the session reports it: the values in force, the gateway's where unset."""
    if detection is None:
        return None
    if detection.type == "semantic_vad":
        return {"type": "semantic_vad", "eagerness": detection.eagerness or "auto"}
    applied = session_turn_config(detection, base)
    return {"type": "server_vad", "threshold": applied.threshold, "prefix_padding_ms": applied.pad_before_ms,
            "silence_duration_ms": applied.silence_ms}
