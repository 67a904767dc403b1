"""Twilio Media Streams, sans-I/O: Twilio's JSON messages in, what to do with them out.

A Media Stream (TwiML ``<Start><Stream>`` or ``<Connect><Stream>``) is one WebSocket
on which Twilio sends, as JSON text frames, ``connected``, one ``start`` (the stream's
and call's sids, its tracks, the ``<Parameter>`` values, the media format), then
``media`` (base64 mu-law, 8 kHz, mono, usually 20 ms per message, on the ``inbound``
or ``outbound`` track), ``dtmf``, ``mark`` and finally ``stop``. Twilio never expects
an answer to any of them, and there is no error message to send back: bad input is
reported to the caller of :meth:`TwilioStream.receive` as :class:`ProtocolError`
actions, counted, and the stream goes on.

Each track is a leg of the session: ``inbound`` (the audio Twilio receives from the
phone) is ``caller``, ``outbound`` (what Twilio plays to the phone: the agent, a
``<Dial>``-ed party, a ``<Say>``) is ``agent``. A bidirectional ``<Connect><Stream>``
sends the inbound track only; ``<Start><Stream track="both_tracks">`` sends both.

Media is placed on its leg's timeline by its ``timestamp`` (ms since the stream
started), not by arrival: Twilio leaves silence out in some cases (a track with
nothing playing), so a later message may start after a gap, which is filled with
silence. That keeps each leg's offsets (the events' ``start_ms``) in stream time
and the two legs aligned with each other. A timestamp may not lead the wall clock
since the stream began by more than ``max_ahead_ms``, and one gap is never filled
with more than ``max_fill_ms``: a bad or hostile timestamp cannot make a leg
allocate minutes of silence. Beyond either bound, and for a timestamp that goes
backwards, the leg's timeline is re-anchored where it is (the audio is kept, the
offset between the two clocks changes) and a ``timestamp-*`` error is reported.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Union

from ...media import g711

#: the leg each Twilio track becomes
TRACK_LEGS = {"inbound": "caller", "outbound": "agent"}
#: other spellings of the tracks: ``<Stream track="inbound_track">`` and the ``dtmf`` message's
_TRACK_ALIASES = {"inbound_track": "inbound", "outbound_track": "outbound"}
_DTMF_DIGITS = frozenset("0123456789*#ABCDabcd")
SAMPLE_RATE = 8000
_SAMPLES_PER_MS = SAMPLE_RATE // 1000
_ENCODING = "audio/x-mulaw"
_SID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


# -- what the stream tells its edge to do

@dataclass(frozen=True)
class StreamStarted:
    """The ``start`` message: open a session with one leg per track.

    ``parameters`` are the ``<Parameter>`` values of the TwiML, in order (the edge
    takes the API token from them; they are not published).
    """

    stream_sid: str
    call_sid: str
    account_sid: str
    legs: tuple[str, ...]
    parameters: tuple[tuple[str, str], ...] = ()

    def parameter(self, name: str, default: str = "") -> str:
        return dict(self.parameters).get(name, default)


@dataclass(frozen=True)
class LegAudio:
    """Decoded 16-bit 8 kHz PCM for ``leg``; its first ``filled`` samples are a gap's silence."""

    leg: str
    pcm: bytes
    filled: int = 0


@dataclass(frozen=True)
class LegDtmf:
    leg: str
    digit: str


@dataclass(frozen=True)
class MarkReceived:
    """Twilio played the audio before a ``mark`` the server sent (Earshot sends none; accepted)."""

    name: str


@dataclass(frozen=True)
class StreamStopped:
    """The stream is over: ``stop`` from Twilio, or the socket closed without one."""

    reason: str  # "stop" | "client-closed"


@dataclass(frozen=True)
class ProtocolError:
    """A message that could not be used in full.

    ``fatal`` only for a stream that cannot be transcribed at all (a media format
    other than mu-law 8 kHz mono): the edge closes it. Every other error leaves the
    stream up; what the message carried that could be used was used.
    """

    code: str
    message: str
    event: str | None = None
    fatal: bool = False


Action = Union[StreamStarted, LegAudio, LegDtmf, MarkReceived, StreamStopped, ProtocolError]


@dataclass
class LegTimeline:
    """Where the next sample of one leg goes, in samples since the stream started."""

    fed: int = 0  # samples handed to the session (audio and filled gaps)
    shift: int = 0  # stream position minus leg position, changed by each re-anchor
    filled: int = 0
    chunks: int = 0


@dataclass
class StreamStats:
    messages: int = 0
    media: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class TwilioStream:
    """One Media Stream's state: fed each WebSocket message and the time it arrived.

    ``now`` is a monotonic clock in seconds; the first message's ``now`` is taken as
    the moment the stream began, for the bound on timestamps.
    """

    def __init__(self, *, max_ahead_ms: int = 5_000, max_fill_ms: int = 60_000,
                 max_media_ms: int = 10_000) -> None:
        self.max_ahead = max_ahead_ms * _SAMPLES_PER_MS
        self.max_fill = max_fill_ms * _SAMPLES_PER_MS
        self.max_media_bytes = max_media_ms * _SAMPLES_PER_MS  # one mu-law byte per sample
        self.started: StreamStarted | None = None
        self.stopped = False
        self.legs: dict[str, LegTimeline] = {}
        self.stats = StreamStats()
        self._origin: float | None = None
        self._track_leg: dict[str, str] = {}

    # -- input
    def receive(self, message: str | bytes, now: float) -> list[Action]:
        """Actions for one WebSocket message (text frame, or bytes from a binary one)."""
        if self._origin is None:
            self._origin = now
        self.stats.messages += 1
        if isinstance(message, (bytes, bytearray)):
            return [self._error("binary-frame", "Twilio sends JSON text frames; a binary frame was ignored")]
        try:
            msg = json.loads(message)
        except (ValueError, RecursionError) as exc:
            return [self._error("invalid-json", f"not JSON: {exc}")]
        if not isinstance(msg, dict):
            return [self._error("invalid-message", "a message must be a JSON object")]
        event = msg.get("event")
        if not isinstance(event, str):
            return [self._error("invalid-message", "the message has no \"event\" string")]
        if self.stopped:
            return [self._error("after-stop", f"{event!r} after stop was ignored", event)]
        handler = self._handlers.get(event)
        if handler is None:
            return [self._error("unknown-event", f"unknown event {event[:40]!r}", event[:40])]
        return handler(self, msg, now)

    def close(self) -> list[Action]:
        """The socket closed: end the session unless ``stop`` already did."""
        if self.started is None or self.stopped:
            return []
        self.stopped = True
        return [StreamStopped("client-closed")]

    # -- messages
    def _connected(self, msg: dict[str, Any], now: float) -> list[Action]:
        return []

    def _start(self, msg: dict[str, Any], now: float) -> list[Action]:
        if self.started is not None:
            return [self._error("duplicate-start", "a second start message was ignored", "start")]
        start = msg.get("start")
        if not isinstance(start, dict):
            return [self._error("invalid-start", "start message without a \"start\" object", "start")]
        stream_sid = start.get("streamSid", msg.get("streamSid"))
        call_sid = start.get("callSid", "")
        account_sid = start.get("accountSid", "")
        for name, value in (("streamSid", stream_sid), ("callSid", call_sid), ("accountSid", account_sid)):
            if not isinstance(value, str) or (value and not _SID.fullmatch(value)):  # fullmatch: "$" alone lets a trailing newline in
                return [self._error("invalid-start", f"start.{name} must be a short id string", "start")]
        if not stream_sid:
            return [self._error("invalid-start", "start.streamSid is missing", "start")]
        media_format = start.get("mediaFormat") or {}
        if not isinstance(media_format, dict):
            return [self._error("invalid-start", "start.mediaFormat must be an object", "start")]
        encoding = media_format.get("encoding", _ENCODING)
        rate = media_format.get("sampleRate", SAMPLE_RATE)
        channels = media_format.get("channels", 1)
        if encoding != _ENCODING or rate != SAMPLE_RATE or channels != 1:
            self.stopped = True
            return [self._error("unsupported-media-format",
                                f"media format {encoding!r} {rate!r} Hz {channels!r} ch: only audio/x-mulaw "
                                f"at 8000 Hz, 1 channel is transcribed", "start", fatal=True)]
        out: list[Action] = []
        tracks = start.get("tracks", ["inbound"])
        if not isinstance(tracks, list):
            tracks = []
        for track in tracks:
            name = _TRACK_ALIASES.get(track, track) if isinstance(track, str) else None
            if name in TRACK_LEGS:
                self._track_leg[name] = TRACK_LEGS[name]
            else:
                out.append(self._error("unknown-track", f"start.tracks: unknown track {str(track)[:40]!r}", "start"))
        if not self._track_leg:  # Twilio's default track is inbound
            self._track_leg["inbound"] = TRACK_LEGS["inbound"]
        parameters: list[tuple[str, str]] = []
        custom = start.get("customParameters") or {}
        if isinstance(custom, dict):
            parameters = [(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in custom.items()]
        else:
            out.append(self._error("invalid-start", "start.customParameters must be an object; ignored", "start"))
        legs = tuple(TRACK_LEGS[t] for t in TRACK_LEGS if t in self._track_leg)
        self.legs = {leg: LegTimeline() for leg in legs}
        self.started = StreamStarted(stream_sid, call_sid, account_sid, legs, tuple(parameters))
        return [self.started, *out]

    def _media(self, msg: dict[str, Any], now: float) -> list[Action]:
        if self.started is None:
            return [self._error("media-before-start", "media before the start message was dropped", "media")]
        media = msg.get("media")
        if not isinstance(media, dict):
            return [self._error("invalid-media", "media message without a \"media\" object", "media")]
        track = media.get("track", "inbound")
        track = _TRACK_ALIASES.get(track, track) if isinstance(track, str) else track
        leg = self._track_leg.get(track) if isinstance(track, str) else None
        if leg is None:
            return [self._error("unknown-track", f"media on track {str(track)[:40]!r}, which start did not "
                                "announce, was dropped", "media")]
        payload = media.get("payload")
        if not isinstance(payload, str):
            return [self._error("invalid-payload", "media.payload must be a base64 string", "media")]
        if len(payload) > (self.max_media_bytes * 4) // 3 + 4:
            return [self._error("oversized-media", f"a media message over {self.max_media_bytes} bytes "
                                "of audio was dropped", "media")]
        try:
            ulaw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return [self._error("invalid-payload", "media.payload is not valid base64; dropped", "media")]
        self.stats.media += 1
        if not ulaw:
            return []
        out: list[Action] = []
        timeline = self.legs[leg]
        timeline.chunks += 1
        gap = 0
        timestamp = _parse_ms(media.get("timestamp"))
        if timestamp is None:
            if media.get("timestamp") is not None:
                out.append(self._error("invalid-timestamp", "media.timestamp is not a number of ms; the audio "
                                       "was placed right after the previous message", "media"))
        else:
            target = timestamp * _SAMPLES_PER_MS - timeline.shift  # leg position this audio should start at
            gap = target - timeline.fed
            if gap < 0:
                timeline.shift += gap  # a timestamp going backwards: keep the audio, re-anchor
                out.append(self._error("timestamp-rewind", f"media.timestamp {timestamp} ms is before the end of "
                                       f"the audio already placed on {leg}; the timeline was re-anchored", "media"))
                gap = 0
            elif gap > 0:
                elapsed = round((now - (self._origin or now)) * SAMPLE_RATE)
                allowed = min(self.max_fill, max(0, elapsed + self.max_ahead - timeline.fed))
                if gap > allowed:
                    timeline.shift += gap - allowed
                    out.append(self._error("timestamp-ahead", f"media.timestamp {timestamp} ms leaves a gap of "
                                           f"{gap // _SAMPLES_PER_MS} ms on {leg}; {allowed // _SAMPLES_PER_MS} ms "
                                           "were filled and the timeline re-anchored", "media"))
                    gap = allowed
        pcm = g711.decode(ulaw, "PCMU")
        if gap:
            pcm = g711.silence(gap) + pcm
            timeline.filled += gap
        timeline.fed += gap + len(ulaw)
        out.insert(0, LegAudio(leg, pcm, gap))
        return out

    def _dtmf(self, msg: dict[str, Any], now: float) -> list[Action]:
        if self.started is None:
            return [self._error("dtmf-before-start", "dtmf before the start message was dropped", "dtmf")]
        dtmf = msg.get("dtmf")
        if not isinstance(dtmf, dict):
            return [self._error("invalid-dtmf", "dtmf message without a \"dtmf\" object", "dtmf")]
        track = dtmf.get("track", "inbound_track")
        track = _TRACK_ALIASES.get(track, track) if isinstance(track, str) else track
        leg = TRACK_LEGS.get(track) if isinstance(track, str) else None
        if leg is None:
            return [self._error("unknown-track", f"dtmf on unknown track {str(track)[:40]!r} was dropped", "dtmf")]
        # Twilio detects digits on the inbound track, streamed or not: a digit is the
        # caller's even on an outbound-only stream (whose session has no caller leg)
        digit = dtmf.get("digit")
        if not isinstance(digit, str) or len(digit) != 1 or digit not in _DTMF_DIGITS:
            return [self._error("invalid-dtmf", f"dtmf.digit {str(digit)[:8]!r} is not one of 0-9 * # A-D", "dtmf")]
        return [LegDtmf(leg, digit.upper())]

    def _mark(self, msg: dict[str, Any], now: float) -> list[Action]:
        mark = msg.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        return [MarkReceived(name if isinstance(name, str) else "")]

    def _stop(self, msg: dict[str, Any], now: float) -> list[Action]:
        if self.started is None:
            self.stopped = True
            return [self._error("stop-before-start", "stop before start: nothing to end", "stop")]
        self.stopped = True
        return [StreamStopped("stop")]

    _handlers = {"connected": _connected, "start": _start, "media": _media, "dtmf": _dtmf,
                 "mark": _mark, "stop": _stop}

    def _error(self, code: str, message: str, event: str | None = None, *, fatal: bool = False) -> ProtocolError:
        self.stats.errors[code] += 1
        return ProtocolError(code, message, event, fatal)


def _parse_ms(value: object) -> int | None:
    """Twilio sends ``timestamp`` as a string of integer ms; accept a JSON number too."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if 0 <= value < 1e12 else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:  # not "²"
        return int(value)
    return None
