"""A transcription session from any source: N legs, one event sequence, one life cycle.

A SIP call, a Realtime WebSocket, a REST upload, a Twilio Media Stream and a
WebRTC peer all become a :class:`Session`: a ``source`` (its kind and the
source's own ids), legs (each one audio stream with its own VAD, turns and ASR
context: a :class:`~gateway.pipeline.LegPipeline`), and the session's events
(``call.started`` ... ``call.ended``) numbered by one
:class:`~gateway.events.EventFactory`. The transport edge only moves audio in
(:meth:`Session.feed`, :meth:`Session.feed_wideband`) and, for the streaming
APIs, events and leg observations out (``listeners`` / ``observer``).

:class:`SessionHost` holds what sessions share: the VAD runner, the
end-of-turn model, the transcriber, the publisher and the settings; the
gateway owns one and ends every open session when it drains.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .events import CALL_ENDED, CALL_STARTED, DTMF, TURN_FINAL, CallInfo, Event, EventError, EventFactory, Source
from .media.turn import TurnConfig
from .output.recording import Recording, RecordingResult, RecordingWriter
from .output.redact import CardContext, Redactor
from .pipeline import EndOfTurn, LegObservation, LegPipeline

if TYPE_CHECKING:
    from .asr.interface import Transcriber, TranscriptionResult
    from .config import Settings
    from .media.vad import BatchedVadRunner

log = logging.getLogger(__name__)


class SessionLimit(Exception):
    """The gateway is at ``max_calls`` (SIP calls and sessions together) or draining."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class LegSpec:
    """How to open one leg: its name, whether it is fed 16 kHz audio, and who ends its turns."""

    name: str
    wideband: bool = False
    manual_turns: bool = False
    origin_ms: Callable[[], float] | None = None  # this leg's sample 0 in the session; None: the session's
    identity: dict[str, str] = field(default_factory=dict)  # SIPREC: role, participant, number on its events


@dataclass
class Session:
    id: str
    info: CallInfo
    events: EventFactory
    legs: dict[str, LegPipeline]
    host: "SessionHost"
    opened_at: float  # monotonic
    listeners: list[Callable[[Event], None]] = field(default_factory=list)
    dtmf_count: int = 0
    # PCI redaction (docs/redaction.md): the legs' shared card context and each leg's redactor;
    # None / empty with redact: off
    card_context: CardContext | None = None
    redactors: dict[str, Redactor[Any]] = field(default_factory=dict)
    ended: bool = False
    end_reason: str | None = None
    transcription_paused: bool = False  # call control's pause (docs/consumers.md): audio in, no turns
    _ending: asyncio.Task[None] | None = None
    # builds a leg with the session's options (set by SessionHost.open): what add_leg uses
    _new_leg: Callable[[LegSpec, Callable[[], float] | None], LegPipeline] | None = None
    # the call's WAV (docs/recordings.md): fed beside the legs, redacted spans muted at the end; None: off
    recording: Recording | None = None
    recording_error: str | None = None  # recording was asked for but could not start

    @property
    def source(self) -> Source:
        return self.info.source

    def offset_ms(self, now: float) -> int:
        return round((now - self.opened_at) * 1000)

    # -- audio in
    def feed(self, leg: str, pcm: bytes, now: float) -> None:
        """16-bit 8 kHz PCM (decoded G.711) for a telephone-rate leg."""
        if not self.ended:
            # paused by call control (gateway/callcontrol.py): the VAD hears silence, so no turns,
            # and the leg's timeline goes on as if transcribing
            self.legs[leg].feed_audio(bytes(len(pcm)) if self.transcription_paused else pcm, now)
            if self.recording is not None:  # paused: silence there too (pause-and-resume for payments)
                self.recording.feed(leg, bytes(len(pcm)) if self.transcription_paused else pcm,
                                    self.legs[leg].origin_ms)

    def feed_wideband(self, leg: str, pcm: np.ndarray, now: float) -> None:
        """16 kHz int16 samples for a wideband leg."""
        if not self.ended:
            self.legs[leg].feed_wideband(np.zeros_like(pcm) if self.transcription_paused else pcm, now)
            if self.recording is not None:
                self.recording.feed(leg, np.zeros_like(pcm) if self.transcription_paused else pcm,
                                    self.legs[leg].origin_ms, rate=16000)

    def commit(self, leg: str, now: float) -> int | None:
        return None if self.ended else self.legs[leg].commit(now)

    def end_turn(self, leg: str) -> None:
        """Turn detection on: end the open turn after the audio fed so far (see LegPipeline.end_turn)."""
        if not self.ended:
            self.legs[leg].end_turn()

    def clear(self, leg: str) -> None:
        if not self.ended:
            self.legs[leg].clear()

    def dtmf(self, leg: str, digit: str, duration_ms: int, now: float) -> None:
        if self.ended:
            return
        self.dtmf_count += 1
        data: dict[str, Any] = {"digit": digit, "duration_ms": int(duration_ms), "offset_ms": self.offset_ms(now)}
        masked = self.card_context.dtmf(digit, time.monotonic()) if self.card_context is not None else None
        if masked is not None:
            data.update(digit=masked, redactions=1)  # a key pressed while card details are being given
        pipeline = self.legs.get(leg)
        if pipeline is not None:
            data.update(pipeline.identity)  # SIPREC: who pressed it
        self.publish(self.events.make(DTMF, data, leg=leg))

    def add_leg(self, spec: LegSpec, origin_ms: Callable[[], float] | None = None) -> LegPipeline:
        """A leg joining the open session (a SIPREC offer with a new stream), on the same
        VAD, ASR and options as the first; ``origin_ms`` places its sample 0 in the session."""
        if self.ended or self._new_leg is None:
            raise ValueError(f"session {self.id} takes no new legs")
        if spec.name in self.legs:
            raise ValueError(f"session {self.id} already has a leg {spec.name!r}")
        pipeline = self._new_leg(spec, origin_ms or spec.origin_ms)
        pipeline.identity = dict(spec.identity)
        self.legs[spec.name] = pipeline
        if self.recording is not None:
            self.recording.add_leg(spec.name)
        self.host.vad_runner.register(pipeline)
        return pipeline

    def redactor(self, leg: str) -> "Redactor[Any] | None":
        """The leg's redactor (a leg without a pipeline, as a REST upload's, gets one here); None: off."""
        if self.card_context is None:
            return None
        if leg not in self.redactors:
            self.redactors[leg] = self.host.new_redactor(self.card_context)
        return self.redactors[leg]

    # -- events out
    def publish(self, event: Event) -> None:
        if self.recording is not None:
            self._mute_redacted(event)
        self.host.publish(event)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("session %s: event listener failed", self.id)

    def _mute_redacted(self, event: Event) -> None:
        """PCI: a redacted final's turn (the call path asks ASR for no word times, so the whole
        turn), or a masked DTMF digit's tone on every leg, is silenced in the recording."""
        assert self.recording is not None
        payload: Any = event.payload
        if event.type == TURN_FINAL and event.leg and payload.start_ms is not None and payload.end_ms is not None:
            self.recording.final(event.leg, payload.start_ms, payload.end_ms, payload.redactions or 0,
                                 payload.text or "")
        elif event.type == DTMF and payload.redactions and payload.offset_ms is not None:
            self.recording.mute(None, payload.offset_ms - (payload.duration_ms or 0), payload.offset_ms)

    # -- end
    def end(self, reason: str, extra: dict[str, Any] | None = None) -> asyncio.Task[None]:
        """Finalise open speech on every leg, publish the finals, then ``call.ended`` (once)."""
        if self._ending is None:
            self.ended = True
            self.end_reason = reason
            self._ending = asyncio.ensure_future(self.host._finish(self, reason, extra or {}))
        return self._ending


class SessionHost:
    """Opens and ends sessions on the gateway's shared media and ASR machinery."""

    def __init__(self, settings: "Settings", *, vad_runner: "BatchedVadRunner", transcriber: "Transcriber",
                 publish: Callable[[Event], None], capacity: Callable[[], int],
                 on_final: Callable[[str, "TranscriptionResult | None", str], None] | None = None,
                 turn_config: TurnConfig | None = None, partials: bool = True,
                 end_of_turn: EndOfTurn | None = None, recordings: RecordingWriter | None = None) -> None:
        """``end_of_turn``: the model legs with the semantic turn policy ask at a pause
        (the gateway's :class:`~gateway.app.EndOfTurnModel`); None: such turns end at
        ``semantic_max_silence_ms``. ``recordings``: where sessions that record write their WAV
        (None: ``recordings_dir`` is not set, and a session asked to record says so in call.ended)."""
        self.recordings = recordings
        self.settings = settings
        self.vad_runner = vad_runner
        self.transcriber = transcriber
        self.publish = publish
        self._capacity = capacity  # free call slots (SIP calls and sessions share max_calls)
        self._on_final = on_final
        self.turn_config = turn_config or TurnConfig()
        self.partials = partials
        self.end_of_turn = end_of_turn
        self.sessions: dict[str, Session] = {}
        self.draining = False
        self.instance = ""  # the gateway instance id, in call.started (set by the gateway)

    def open(self, source: Source, legs: list[LegSpec], *, language: str | None = None,
             tags: tuple[str, ...] = (), started: dict[str, Any] | None = None,
             turn_config: TurnConfig | None = None, partials: bool | None = None,
             observer: Callable[[LegObservation], None] | None = None,
             listeners: list[Callable[[Event], None]] | None = None,
             session_id: str | None = None, sip_call_id: str = "", from_uri: str = "", to_uri: str = "",
             origin_ms: Callable[[], float] | None = None, admit: bool = True,
             redact: str | None = None, record: bool | None = None) -> Session:
        """A new session with its legs registered for VAD, and its ``call.started`` published.

        ``session_id`` (the call id) is for a source that must name the session before it
        opens (WHIP's resource URL carries it); by default a fresh UUID. ``sip_call_id``,
        ``from_uri`` and ``to_uri`` are a SIP session's; ``origin_ms`` places the legs' sample 0
        in the session (a SIP call's first RTP packet after the answer). ``admit=False``: the
        caller has already admitted the session (SIP call control answers 503 itself).
        ``redact``: ``pci`` or ``off`` for this session (a dialplan rule's); None: the ``redact`` setting.
        ``record``: write the session's WAV (a dialplan rule's); None: the ``record`` setting.
        """
        if admit and self.draining:
            raise SessionLimit("draining")
        if admit and self._capacity() <= 0:
            raise SessionLimit("capacity")
        s = self.settings
        session_id = session_id or str(uuid.uuid4())
        if session_id in self.sessions:
            raise ValueError(f"session {session_id} is already open")
        info = CallInfo(call_id=session_id, sip_call_id=sip_call_id, from_uri=from_uri, to_uri=to_uri,
                        started_at=time.time(), tags=tuple(tags), source=source)
        events = EventFactory(info)
        config = turn_config or self.turn_config
        with_partials = self.partials if partials is None else partials
        session = Session(id=session_id, info=info, events=events, legs={}, host=self,
                          opened_at=time.monotonic(), listeners=list(listeners or []))
        if (redact or s.redact) != "off":
            session.card_context = CardContext()

        def new_leg(spec: LegSpec, leg_origin: Callable[[], float] | None) -> LegPipeline:
            leg_origin = leg_origin or origin_ms
            return LegPipeline(
                key=f"{session_id}/{spec.name}",
                leg=spec.name,
                events=events,
                publish=session.publish,
                transcriber=self.transcriber,
                turn_config=config,
                language=language,
                resampler=s.resampler,
                partials=with_partials,
                context=s.asr_context_tokens > 0 or s.asr_context_audio_s > 0,
                context_audio_s=s.asr_context_audio_s,
                on_final=self._on_final,
                session=session_id,
                final_timeout_s=s.asr_final_timeout_s,
                partial_timeout_s=s.asr_partial_timeout_s,
                wideband=spec.wideband,
                manual_turns=spec.manual_turns,
                observer=observer,
                end_of_turn=self.end_of_turn,
                redactor=session.redactor(spec.name),
                max_backlog=int(s.media_backlog_s * 8000 / 256),  # media_backlog_s in 32 ms VAD chunks
                **({"origin_ms": leg_origin} if leg_origin is not None else {}),
            )

        session._new_leg = new_leg
        if s.record if record is None else record:
            if self.recordings is None:
                session.recording_error = "no-directory"
            else:
                session.recording = self.recordings.open(session_id, info.started_at,
                                                         rate=16000 if any(x.wideband for x in legs) else 8000)
                for spec in legs:
                    session.recording.add_leg(spec.name)
        for spec in legs:
            session.legs[spec.name] = new_leg(spec, spec.origin_ms)
            session.legs[spec.name].identity = dict(spec.identity)
        for pipeline in session.legs.values():
            self.vad_runner.register(pipeline)
        self.sessions[session_id] = session
        session.publish(events.make(CALL_STARTED, {
            "language": language,
            "legs": [spec.name for spec in legs],
            **({"gateway": self.instance} if self.instance else {}),
            **(started or {}),
        }))
        return session

    def new_redactor(self, context: CardContext) -> "Redactor[Any]":
        return Redactor(context, hold_s=self.settings.redact_hold_ms / 1000)

    async def _finish(self, session: Session, reason: str, extra: dict[str, Any]) -> None:
        try:
            now = time.monotonic()
            for pipeline in session.legs.values():
                pipeline.finish_input(now)
            await self.vad_runner.drain()
            for pipeline in session.legs.values():
                self.vad_runner.unregister(pipeline)
            await asyncio.gather(*(pipeline.close() for pipeline in session.legs.values()))
            ended = {
                "reason": reason,
                "duration_ms": round((time.monotonic() - session.opened_at) * 1000),
                "turns": sum(p.turns_published for p in session.legs.values()),
                "dtmf": session.dtmf_count,
                **(await self._finish_recording(session)),
            }
            try:
                event = session.events.make(CALL_ENDED, {**ended, **extra})
            except EventError as exc:
                # a producer's bad extra field must not cost the session its last event
                log.error("session %s: call.ended without its extra fields: %s", session.id, exc)
                event = session.events.make(CALL_ENDED, ended)
            session.publish(event)
        except Exception:
            log.exception("error while ending session %s", session.id)
        finally:
            self.sessions.pop(session.id, None)

    async def _finish_recording(self, session: Session) -> dict[str, Any]:
        """The recording's call.ended fields, after every final (so every redacted span is known)."""
        if session.recording is None:
            return RecordingResult(None, error=session.recording_error).fields()
        try:
            return (await session.recording.finish()).fields()
        except Exception:
            log.exception("session %s: recording could not be finished", session.id)
            return RecordingResult(None, error="write-error").fields()

    async def close(self, reason: str = "shutdown") -> None:
        """End every open session (gateway drain)."""
        self.draining = True
        tasks = [session.end(reason) for session in list(self.sessions.values())]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
