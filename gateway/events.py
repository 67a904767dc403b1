"""Transcript events: the versioned JSON schema published to Redis Streams.

The schema is documented in docs/events.md; change both together and bump
``SCHEMA`` on any incompatible change. Every event carries an ``event_id`` that is
stable across retries (call id + per-call event number), so consumers stay
idempotent when a publish is retried after a lost acknowledgement.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

SCHEMA = "earshot.event.v2"
#: schemas a consumer reads: v1 events (SIP only, before ``source``) may still sit in a stream
READABLE_SCHEMAS = ("earshot.event.v1", SCHEMA)

CALL_STARTED = "call.started"
TURN_PARTIAL = "turn.partial"
TURN_FINAL = "turn.final"
DTMF = "dtmf"
CALL_ENDED = "call.ended"
EVENT_TYPES = (CALL_STARTED, TURN_PARTIAL, TURN_FINAL, DTMF, CALL_ENDED)


SOURCE_KINDS = ("sip", "siprec", "realtime", "rest", "twilio", "webrtc")
SIP_KINDS = ("sip", "siprec")


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
            raise ValueError(f"unknown source kind {self.kind!r}")

    def to_wire(self) -> dict[str, str]:
        return {"kind": self.kind, **dict(self.ids)}

    def get(self, name: str, default: str = "") -> str:
        return dict(self.ids).get(name, default)


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
    started_at: float = 0.0  # wall clock, seconds since the epoch
    tags: tuple[str, ...] = ()
    source: Source = Source("sip")


@dataclass
class Event:
    type: str
    call: CallInfo
    number: int  # per-call event sequence, 1-based
    data: dict[str, Any] = field(default_factory=dict)
    leg: str | None = None
    created_at: float = field(default_factory=time.time)
    # monotonic time at which the speaker stopped (turn.final only): the
    # publisher turns it into latency_ms when Redis accepts the event
    speech_end_monotonic: float | None = None

    @property
    def event_id(self) -> str:
        return f"{self.call.call_id}:{self.number:06d}"

    def to_dict(self, published_monotonic: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "schema": SCHEMA,
            "type": self.type,
            "event_id": self.event_id,
            "call_id": self.call.call_id,
            "source": self.call.source.to_wire(),
        }
        if self.call.source.kind in SIP_KINDS:
            body["sip_call_id"] = self.call.sip_call_id
            body["from"] = self.call.from_uri
            body["to"] = self.call.to_uri
        body["tags"] = list(self.call.tags)
        body["time"] = _iso(self.created_at)
        if self.leg is not None:
            body["leg"] = self.leg
        body.update(self.data)
        if self.speech_end_monotonic is not None:
            now = time.monotonic() if published_monotonic is None else published_monotonic
            body["latency_ms"] = round((now - self.speech_end_monotonic) * 1000.0, 1)
        return body

    def to_fields(self, published_monotonic: float | None = None) -> dict[str, str]:
        """Redis stream entry fields: routing keys in the clear, the event as JSON."""
        return {
            "event_id": self.event_id,
            "type": self.type,
            "call_id": self.call.call_id,
            "data": json.dumps(self.to_dict(published_monotonic), separators=(",", ":")),
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_fields(fields: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    """Decode one stream entry written by :meth:`Event.to_fields`."""
    raw = fields.get("data", fields.get(b"data"))
    if raw is None:
        raise ValueError("stream entry has no 'data' field")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return json.loads(raw)


class EventFactory:
    """Numbers a call's events; one per call."""

    def __init__(self, call: CallInfo) -> None:
        self.call = call
        self._number = 0

    def make(self, type: str, data: dict[str, Any] | None = None, *, leg: str | None = None,
             speech_end_monotonic: float | None = None) -> Event:
        self._number += 1
        return Event(type=type, call=self.call, number=self._number, data=data or {}, leg=leg,
                     speech_end_monotonic=speech_end_monotonic)
