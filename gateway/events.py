"""Transcript events: one typed definition of each event, its validation and its wire form.

The schema is documented in docs/events.md (a test checks that the doc's tables
and these classes name the same fields); change both together and bump
``SCHEMA`` on any incompatible change. Every event carries an ``event_id`` that
is stable across retries (call id + per-call event number), so consumers stay
idempotent when a publish is retried after a lost acknowledgement.

Each event type's payload is a frozen dataclass (:class:`CallStarted`,
:class:`TurnPartial`, :class:`TurnFinal`, :class:`Dtmf`, :class:`CallEnded`)
with ``to_wire()`` and a validating ``from_wire()``. Producers build events
through :meth:`EventFactory.make`, which validates the payload there, where a
bug can be found, instead of in every consumer; consumers (the persister, the
live board, ``earshot tail``) decode with :meth:`Event.from_wire`, which raises
:class:`EventError` naming the field at fault. Decoding ignores fields it does
not know (a newer producer may add some); building refuses them, so the doc
cannot fall behind the code.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, ClassVar, Mapping, Union

SCHEMA = "earshot.event.v2"
SCHEMA_V1 = "earshot.event.v1"
#: schemas a consumer reads: v1 events (SIP only, before ``source``) may still sit in a stream
READABLE_SCHEMAS = (SCHEMA_V1, SCHEMA)

CALL_STARTED = "call.started"
TURN_PARTIAL = "turn.partial"
TURN_FINAL = "turn.final"
DTMF = "dtmf"
CALL_ENDED = "call.ended"
EVENT_TYPES = (CALL_STARTED, TURN_PARTIAL, TURN_FINAL, DTMF, CALL_ENDED)
#: events that belong to one leg (they carry ``leg``)
LEG_EVENTS = (TURN_PARTIAL, TURN_FINAL, DTMF)

SOURCE_KINDS = ("sip", "siprec", "realtime", "rest", "twilio", "webrtc")
SIP_KINDS = ("sip", "siprec")
#: the ids each kind of source carries (docs/events.md, ``source``)
SOURCE_IDS: dict[str, tuple[str, ...]] = {
    "sip": ("call_id", "transport"),
    "siprec": ("call_id", "transport"),
    "realtime": ("session_id",),
    "rest": ("request_id", "filename"),
    "twilio": ("call_sid", "stream_sid", "account_sid"),
    "webrtc": ("session_id",),
}

MAX_INT = 2**31 - 1  # what the SQL store's INTEGER columns hold
MAX_OBJECTS = 64  # entries of a list of objects (participants of a SIPREC call)
#: what a SIPREC participant is to the contact center (docs/siprec.md)
ROLES = ("customer", "agent", "unknown")


class EventError(ValueError):
    """An event (or payload) that does not match the schema; the message names the field."""


# -- field checks, shared by every payload


def _text(value: Any, name: str, max_len: int, *, empty: bool = True) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise EventError(f"{name}: expected {'a' if empty else 'a non-empty'} string, got {value!r:.60}")
    if len(value) > max_len:
        raise EventError(f"{name}: longer than {max_len} characters")
    return value


def _int(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EventError(f"{name}: expected a number, got {value!r:.60}")
    if value < minimum or value > MAX_INT:
        raise EventError(f"{name}: {value} out of range")
    return int(value)


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EventError(f"{name}: expected a finite number, got {value!r:.60}")
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise EventError(f"{name}: expected true or false, got {value!r:.60}")
    return value


def _strings(value: Any, name: str, max_len: int) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and 0 < len(v) <= max_len for v in value):
        raise EventError(f"{name}: expected a list of non-empty strings of at most {max_len} characters, "
                         f"got {value!r:.60}")
    return tuple(value)


def _object(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise EventError(f"{name}: expected an object, got {value!r:.60}")
    return value


# A payload field is declared with one of these; the metadata says how to check
# it, whether it is required, and whether to_wire writes it when it is None.

def _spec(check: str, *, arg: Any = None, required: bool = False, default: Any = None, null: bool = False,
          minimum: int = 0, empty: bool = True) -> Any:
    meta = {"check": check, "arg": arg, "required": required, "null": null, "minimum": minimum, "empty": empty}
    if required:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def text_field(max_len: int, **kw: Any) -> Any:
    return _spec("text", arg=max_len, **kw)


def int_field(**kw: Any) -> Any:
    return _spec("int", **kw)


def number_field(**kw: Any) -> Any:
    return _spec("float", **kw)


def bool_field(**kw: Any) -> Any:
    return _spec("bool", **kw)


def strings_field(max_len: int, **kw: Any) -> Any:
    return _spec("strings", arg=max_len, default=(), **kw)


def object_field(cls: type, **kw: Any) -> Any:
    return _spec("nested", arg=cls, **kw)


def objects_field(cls: type, **kw: Any) -> Any:
    """A list of nested objects (``participants`` of call.started)."""
    return _spec("objects", arg=cls, default=(), **kw)


class Payload:
    """Base of the typed parts of events: decoding, validation and the wire form, from the field specs."""

    #: type name on the wire, for the event payloads
    TYPE: ClassVar[str] = ""

    @classmethod
    def from_wire(cls, body: Any, *, prefix: str = "", strict: bool = False) -> Any:
        """Validate ``body`` (a decoded JSON object) into an instance; :class:`EventError` names the field.

        ``strict``: refuse fields this class does not define (building an event);
        decoding ignores them, as a reader of a newer producer's events must.
        """
        body = _object(body, prefix.rstrip(".") or "payload")
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            meta = f.metadata
            name = prefix + f.name
            value = body.get(f.name)
            if value is None:
                if meta["required"]:
                    raise EventError(f"{name}: missing")
                continue
            check = meta["check"]
            if check == "text":
                values[f.name] = _text(value, name, meta["arg"], empty=meta["empty"])
            elif check == "int":
                values[f.name] = _int(value, name, meta["minimum"])
            elif check == "float":
                values[f.name] = _float(value, name)
            elif check == "bool":
                values[f.name] = _bool(value, name)
            elif check == "strings":
                values[f.name] = _strings(value, name, meta["arg"])
            elif check == "nested":
                values[f.name] = value if isinstance(value, meta["arg"]) else \
                    meta["arg"].from_wire(value, prefix=name + ".", strict=strict)
            elif check == "objects":
                if not isinstance(value, (list, tuple)) or len(value) > MAX_OBJECTS:
                    raise EventError(f"{name}: expected a list of at most {MAX_OBJECTS} objects, got {value!r:.60}")
                values[f.name] = tuple(
                    item if isinstance(item, meta["arg"]) else
                    meta["arg"].from_wire(item, prefix=f"{name}[{i}].", strict=strict)
                    for i, item in enumerate(value))
        if strict:
            known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
            unknown = sorted(str(k) for k in body if k not in known)
            if unknown:
                where = f" in {prefix.rstrip('.')}" if prefix else f" in a {cls.TYPE or cls.__name__} payload"
                raise EventError(f"{prefix}{unknown[0]}: unknown field{where} (docs/events.md lists the fields)")
        return cls(**values)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and not f.metadata["null"]:
                continue
            if isinstance(value, Payload):
                value = value.to_wire()
            elif isinstance(value, tuple):
                value = [v.to_wire() if isinstance(v, Payload) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def field_names(cls, prefix: str = "") -> set[str]:
        """Every wire field, nested ones as ``parent.child`` (what docs/events.md documents)."""
        names: set[str] = set()
        for f in fields(cls):  # type: ignore[arg-type]
            names.add(prefix + f.name)
            if f.metadata["check"] in ("nested", "objects"):
                names |= f.metadata["arg"].field_names(prefix + f.name + ".")
        return names


# -- the nested objects


@dataclass(frozen=True)
class Confidence(Payload):
    """How sure ASR was of a transcript (Whisper's own measures)."""

    avg_logprob: float | None = number_field()
    no_speech_prob: float | None = number_field()
    compression_ratio: float | None = number_field()
    language_probability: float | None = number_field()


@dataclass(frozen=True)
class AsrInfo(Payload):
    """Which model produced a transcript, and what it cost."""

    model: str | None = text_field(256)
    audio_ms: float | None = number_field()
    processing_ms: float | None = number_field()
    speculative: bool | None = bool_field()


@dataclass(frozen=True)
class RtpStats(Payload):
    """A SIP call's RTP counts at its end."""

    packets: int | None = int_field()
    lost: int | None = int_field()
    late: int | None = int_field()
    duplicates: int | None = int_field()
    foreign_dropped: int | None = int_field()
    malformed: int | None = int_field()


@dataclass(frozen=True)
class Participant(Payload):
    """A party of a SIPREC recording (RFC 7865 metadata) and the leg that carries its voice."""

    leg: str | None = text_field(64)
    role: str | None = text_field(16)
    name: str | None = text_field(256)
    number: str | None = text_field(64)
    aor: str | None = text_field(512)


# -- one payload per event type


@dataclass(frozen=True)
class CallStarted(Payload):
    TYPE: ClassVar[str] = CALL_STARTED

    codec: str | None = text_field(16)
    remote_media: str | None = text_field(300)
    local_media_port: int | None = int_field()
    transport: str | None = text_field(8)
    dialplan_rule: str | None = text_field(256)
    dialplan_profile: str | None = text_field(64)  # the profile the rule selected; absent without one
    dialplan_version: str | None = text_field(64)  # the dialplan version that routed the call (docs/dialplan.md)
    trunk: str | None = text_field(64)
    language: str | None = text_field(16, null=True)
    legs: tuple[str, ...] = strings_field(64)
    participants: tuple[Participant, ...] = objects_field(Participant)
    gateway: str | None = text_field(128)  # the gateway instance carrying the session (its heartbeat; gateway-lost)


@dataclass(frozen=True)
class TurnPartial(Payload):
    TYPE: ClassVar[str] = TURN_PARTIAL

    turn: int = int_field(required=True, minimum=1)
    partial: int = int_field(required=True, minimum=1)
    start_ms: int = int_field(required=True)
    end_ms: int = int_field(required=True)
    text: str = text_field(100_000, required=True)
    language: str | None = text_field(16)
    confidence: Confidence | None = object_field(Confidence)
    asr: AsrInfo | None = object_field(AsrInfo)
    redactions: int | None = int_field()  # spans replaced by PCI redaction (gateway/output/redact.py)
    role: str | None = text_field(16)  # SIPREC: the leg's participant (docs/siprec.md)
    participant: str | None = text_field(256)
    number: str | None = text_field(64)


@dataclass(frozen=True)
class TurnFinal(Payload):
    TYPE: ClassVar[str] = TURN_FINAL

    turn: int = int_field(required=True, minimum=1)
    start_ms: int = int_field(required=True)
    end_ms: int = int_field(required=True)
    text: str = text_field(100_000, default="")
    reason: str | None = text_field(16)
    partials: int | None = int_field()
    language: str | None = text_field(16)
    confidence: Confidence | None = object_field(Confidence)
    asr: AsrInfo | None = object_field(AsrInfo)
    latency_ms: float | None = number_field()  # set by the publisher when Redis accepts the event
    error: str | None = text_field(32)
    redactions: int | None = int_field()  # spans replaced by PCI redaction (gateway/output/redact.py)
    role: str | None = text_field(16)  # SIPREC: the leg's participant (docs/siprec.md)
    participant: str | None = text_field(256)
    number: str | None = text_field(64)


@dataclass(frozen=True)
class Dtmf(Payload):
    TYPE: ClassVar[str] = DTMF

    digit: str = text_field(8, required=True, empty=False)
    duration_ms: int | None = int_field()
    offset_ms: int | None = int_field()
    redactions: int | None = int_field()  # 1: the digit was masked as * (a card context was active)
    role: str | None = text_field(16)  # SIPREC: the leg's participant (docs/siprec.md)
    participant: str | None = text_field(256)
    number: str | None = text_field(64)


@dataclass(frozen=True)
class CallEnded(Payload):
    TYPE: ClassVar[str] = CALL_ENDED

    reason: str | None = text_field(32)
    duration_ms: int | None = int_field()
    turns: int | None = int_field()
    dtmf: int | None = int_field()
    rtp: RtpStats | None = object_field(RtpStats)
    # the call's recording (docs/recordings.md): path relative to recordings_dir, its length and size;
    # recording_error when one was asked for and there is none (queue-full, disk-full, write-error, no-directory)
    recording: str | None = text_field(256)
    recording_duration_ms: int | None = int_field()
    recording_bytes: int | None = int_field()
    recording_error: str | None = text_field(32)


EventPayload = Union[CallStarted, TurnPartial, TurnFinal, Dtmf, CallEnded]
PAYLOADS: dict[str, type[Payload]] = {cls.TYPE: cls for cls in (CallStarted, TurnPartial, TurnFinal, Dtmf, CallEnded)}


def payload_from_data(kind: str, data: Mapping[str, Any] | Payload | None) -> EventPayload:
    """A producer's payload (a dict of wire fields, or already typed), validated strictly."""
    cls = PAYLOADS.get(kind)
    if cls is None:
        raise EventError(f"type: unknown event type {kind!r:.60}")
    if isinstance(data, cls):
        return data  # type: ignore[return-value]
    if isinstance(data, Payload):
        raise EventError(f"payload: a {type(data).__name__} is not the payload of a {kind} event")
    return cls.from_wire(data or {}, strict=True)  # type: ignore[no-any-return]


# -- the envelope


@dataclass(frozen=True)
class Source:
    """Where a session's audio comes from, and that source's own ids (docs/events.md, ``source``).

    ``ids`` are the identifiers a consumer can match against the source's own records:
    SIP's Call-ID, Twilio's callSid and streamSid, a Realtime or WHIP session id, the
    name of an uploaded file.
    """

    kind: str
    ids: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise EventError(f"source.kind: unknown source kind {self.kind!r:.60}")
        for name, value in self.ids:
            if not isinstance(name, str) or not name or len(name) > 32 or name == "kind":
                raise EventError(f"source: bad id name {name!r:.60}")
            _text(value, f"source.{name}", 1024)

    def to_wire(self) -> dict[str, str]:
        return {"kind": self.kind, **dict(self.ids)}

    @classmethod
    def from_wire(cls, body: Any) -> Source:
        body = _object(body, "source")
        kind = body.get("kind")
        if not isinstance(kind, str):
            raise EventError(f"source.kind: expected a string, got {kind!r:.60}")
        return cls(kind, tuple((str(k), v) for k, v in body.items() if k != "kind"))

    def get(self, name: str, default: str = "") -> str:
        return dict(self.ids).get(name, default)

    @property
    def is_sip(self) -> bool:
        return self.kind in SIP_KINDS


@dataclass
class CallInfo:
    """What every event of a session repeats, so a consumer never needs a join.

    ``sip_call_id``, ``from_uri`` and ``to_uri`` are a SIP session's; other sources
    leave them empty and carry their ids in ``source``.
    """

    call_id: str
    sip_call_id: str = ""
    from_uri: str = ""
    to_uri: str = ""
    started_at: float = 0.0  # wall clock, seconds since the epoch (0 when decoded: not on the wire)
    tags: tuple[str, ...] = ()
    source: Source = Source("sip")


class Event:
    """One event of a session: the envelope every event repeats, and its typed payload.

    ``data`` is the payload as a dict of its wire fields (``event.data["text"]``);
    ``payload`` is the typed form. Built by :meth:`EventFactory.make` in the
    gateway, or decoded from a stream entry by :meth:`from_wire`.
    """

    __slots__ = ("type", "call", "number", "payload", "leg", "created_at", "speech_end_monotonic",
                 "schema", "_event_id")

    def __init__(self, type: str, call: CallInfo, number: int,
                 data: Mapping[str, Any] | Payload | None = None, leg: str | None = None,
                 created_at: float | None = None, speech_end_monotonic: float | None = None, *,
                 schema: str = SCHEMA, event_id: str | None = None) -> None:
        self.type = type
        self.call = call
        self.number = number  # per-call event sequence, 1-based
        self.payload: EventPayload = payload_from_data(type, data)
        if type in LEG_EVENTS or leg is not None:
            _text(leg, "leg", 64, empty=False)
        self.leg = leg
        self.created_at = time.time() if created_at is None else created_at
        # monotonic time at which the speaker stopped (turn.final only): the
        # publisher turns it into latency_ms when Redis accepts the event
        self.speech_end_monotonic = speech_end_monotonic
        self.schema = schema  # the schema it was read as (decoded events)
        self._event_id = event_id

    @property
    def data(self) -> dict[str, Any]:
        """The payload's wire fields, as a new dict (changing it changes nothing)."""
        return self.payload.to_wire()

    @property
    def event_id(self) -> str:
        return self._event_id if self._event_id is not None else f"{self.call.call_id}:{self.number:06d}"

    @property
    def call_id(self) -> str:
        return self.call.call_id

    @property
    def source(self) -> Source:
        return self.call.source

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.created_at, timezone.utc)

    def __repr__(self) -> str:
        return f"<Event {self.event_id} {self.type} leg={self.leg} {self.payload!r}>"

    def to_dict(self, published_monotonic: float | None = None) -> dict[str, Any]:
        """The wire form (docs/events.md), always in the current schema."""
        body: dict[str, Any] = {
            "schema": SCHEMA,
            "type": self.type,
            "event_id": self.event_id,
            "call_id": self.call.call_id,
            "source": self.call.source.to_wire(),
        }
        if self.call.source.is_sip:
            body["sip_call_id"] = self.call.sip_call_id
            body["from"] = self.call.from_uri
            body["to"] = self.call.to_uri
        body["tags"] = list(self.call.tags)
        body["time"] = _iso(self.created_at)
        if self.leg is not None:
            body["leg"] = self.leg
        body.update(self.payload.to_wire())
        if self.speech_end_monotonic is not None:
            now = time.monotonic() if published_monotonic is None else published_monotonic
            body["latency_ms"] = round((now - self.speech_end_monotonic) * 1000.0, 1)
        return body

    to_wire = to_dict

    def to_fields(self, published_monotonic: float | None = None) -> dict[str, str]:
        """Redis stream entry fields: routing keys in the clear, the event as JSON."""
        return {
            "event_id": self.event_id,
            "type": self.type,
            "call_id": self.call.call_id,
            "data": json.dumps(self.to_dict(published_monotonic), separators=(",", ":")),
        }

    @classmethod
    def from_wire(cls, body: Any) -> Event:
        """Decode and validate one event in schema v1 or v2; :class:`EventError` names the field at fault.

        A v1 event (SIP only) has ``sip_call_id``, ``from`` and ``to`` and no
        ``source``; it decodes to a ``sip`` source whose ``call_id`` is the SIP Call-ID.
        """
        if not isinstance(body, Mapping):
            raise EventError("event is not a JSON object")
        schema = body.get("schema")
        if schema not in READABLE_SCHEMAS:
            raise EventError(f"schema: unknown schema {schema!r:.60}")
        kind = body.get("type")
        if kind not in EVENT_TYPES:
            raise EventError(f"type: unknown event type {kind!r:.60}")
        event_id = _text(body.get("event_id"), "event_id", 96, empty=False)
        call_id = _text(body.get("call_id"), "call_id", 64, empty=False)
        sip = {key: _text(body[key], key, 2048) if body.get(key) is not None else ""
               for key in ("sip_call_id", "from", "to")}
        if schema == SCHEMA_V1:
            source = Source("sip", (("call_id", sip["sip_call_id"]),))
        else:
            if body.get("source") is None:
                raise EventError("source: missing (every v2 event has one)")
            source = Source.from_wire(body["source"])
        tags = _strings(body["tags"], "tags", 255) if body.get("tags") is not None else ()
        raw_time = _text(body.get("time"), "time", 64, empty=False)
        try:
            when = datetime.fromisoformat(raw_time)
        except ValueError:
            raise EventError(f"time: not an ISO 8601 time: {raw_time!r:.60}") from None
        if when.tzinfo is None:
            raise EventError(f"time: no time zone in {raw_time!r:.60}")
        leg = body.get("leg")
        if kind in LEG_EVENTS or leg is not None:
            leg = _text(leg, "leg", 64, empty=False)
        payload = PAYLOADS[kind].from_wire(body)
        info = CallInfo(call_id=call_id, sip_call_id=sip["sip_call_id"], from_uri=sip["from"], to_uri=sip["to"],
                        tags=tags, source=source)
        tail = event_id.rpartition(":")[2]
        number = int(tail) if tail.isascii() and tail.isdigit() and len(tail) <= 12 else 0
        return cls(kind, info, number, payload, leg, when.timestamp(), schema=schema, event_id=event_id)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_fields(fields: Mapping[bytes | str, bytes | str]) -> dict[str, Any]:
    """The JSON object of one stream entry written by :meth:`Event.to_fields` (not validated)."""
    raw = fields.get("data", fields.get(b"data"))
    if raw is None:
        raise ValueError("stream entry has no 'data' field")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return json.loads(raw)  # type: ignore[no-any-return]


def decode_fields(fields: Mapping[bytes | str, bytes | str]) -> Event:
    """One stream entry as a validated :class:`Event`; ValueError (EventError) when it is not one."""
    try:
        body = parse_fields(fields)
    except UnicodeDecodeError:
        raise EventError("'data' is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise EventError(f"'data' is not valid JSON: {exc}") from None
    return Event.from_wire(body)


class EventFactory:
    """Numbers a call's events; one per call."""

    def __init__(self, call: CallInfo) -> None:
        source = call.source
        for name, _value in source.ids:
            if name not in SOURCE_IDS[source.kind]:
                raise EventError(f"source.{name}: not an id of a {source.kind} source "
                                 f"({', '.join(SOURCE_IDS[source.kind])}; docs/events.md, source)")
        self.call = call
        self._number = 0

    def make(self, type: str, data: Mapping[str, Any] | Payload | None = None, *, leg: str | None = None,
             speech_end_monotonic: float | None = None) -> Event:
        """The next event of the call; ``data`` (a dict of wire fields, or the typed payload) is validated,
        and a field of the wrong type or unknown to docs/events.md raises :class:`EventError`."""
        event = Event(type, self.call, self._number + 1, data, leg, speech_end_monotonic=speech_end_monotonic)
        self._number += 1  # only once valid: a refused event leaves no gap in the numbers
        return event
