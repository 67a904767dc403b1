"""One answered call: its SIP dialog, RTP socket and receiver, and the session they feed.

The gateway owns the life cycle (answer, re-INVITE, end); this class holds the
per-call SIP and RTP state and moves decoded RTP audio and digits into the call's
:class:`~gateway.session.Session` (one leg), as every other ingest does.

A SIPREC recording call (RFC 7866) has one RTP stream per recorded party: the
first is the call's own ``receiver``/``socket`` (leg ``leg``), every further one a
:class:`RecordedLeg` in ``recorded``, each with its own port, receiver, latch and
origin, feeding its own leg of the same session (docs/siprec.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Callable

from .sdp import SessionDescription
from .rtp.dtmf import DtmfEvent
from .rtp.receiver import AudioChunk, ReceiverStats, RtpReceiver
from .rtp.srtp import SrtpContext
from .rtp.transport import RtpSocket
from .session import Session

log = logging.getLogger(__name__)


@dataclass
class RecordedLeg:
    """A further recorded stream of a SIPREC call: its m-line, port, receiver and leg."""

    leg: str
    label: str
    mline: int
    receiver: RtpReceiver
    local_port: int
    codec: str
    socket: RtpSocket | None = None
    first_packet_at: float | None = None
    paused: bool = False


@dataclass
class Call:
    call_id: str
    dialog_id: str
    leg: str
    receiver: RtpReceiver
    answered_at: float  # monotonic
    local_port: int
    codec: str
    session_id: int
    language: str | None
    socket: RtpSocket | None = None
    pending_offer: SessionDescription | None = None  # our SDP offer awaiting the peer's answer
    on_hold: bool = False
    held_since: float | None = None  # monotonic; while on hold the media timeout gives way to hold_timeout_s
    session_expires_at: float | None = None  # RFC 4028: no refresh by then ends the call
    confirmed: bool = False
    ending: bool = False
    first_packet_at: float | None = None
    sdp_version: int = 1
    session: Session | None = None  # opened when the call is answered
    srtp: SrtpContext | None = None  # SDES-keyed SRTP: datagrams are unprotected before the receiver sees them
    srtp_policy: str = "off"  # what re-INVITEs are negotiated with (off | optional | required)
    clock: Callable[[], float] = field(default=lambda: 0.0)
    # SIPREC: the first stream's a=label and m-line, the further streams, the metadata so far
    siprec: bool = False
    label: str = ""
    mline: int = 0
    recorded: list[RecordedLeg] = field(default_factory=list)
    metadata: object | None = None  # gateway.siprec.metadata.RecordingMetadata
    last_answer: bytes = b""  # our latest SDP answer (a SIPREC re-INVITE without SDP gets it as our offer)
    peer_host: str = ""  # the SIP peer's address (a SIPREC stream added later latches on it too)

    def receivers(self) -> list[RtpReceiver]:
        """Every stream's receiver, the call's own first."""
        return [self.receiver] + [r.receiver for r in self.recorded]

    def rtp_stats(self) -> ReceiverStats:
        """The RTP counts of every stream of the call, summed."""
        if not self.recorded:
            return self.receiver.stats
        total = ReceiverStats()
        for receiver in self.receivers():
            for f in fields(ReceiverStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(receiver.stats, f.name))
        return total

    def sockets(self) -> list[RtpSocket]:
        return [s for s in [self.socket] + [r.socket for r in self.recorded] if s is not None]

    def leg_origin(self, recorded: RecordedLeg) -> Callable[[], float]:
        """Where a further stream's sample 0 sits in the call, in ms (its own first packet)."""
        def origin() -> float:
            return 0.0 if recorded.first_packet_at is None else (recorded.first_packet_at - self.answered_at) * 1000.0
        return origin

    def on_recorded(self, recorded: RecordedLeg, data: bytes, source: tuple[str, int]) -> None:
        """A datagram on a further SIPREC stream's port (plain RTP only)."""
        if self.ending or self.session is None:
            return
        now = self.clock()
        if recorded.first_packet_at is None:
            recorded.first_packet_at = now
        self._dispatch(recorded.receiver.receive(data, source, now), now, recorded.leg)

    def origin_ms(self) -> float:
        """Where the leg's sample 0 (first RTP packet) sits in the call, in ms."""
        if self.first_packet_at is None:
            return 0.0
        return (self.first_packet_at - self.answered_at) * 1000.0

    def on_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        if self.ending or self.session is None:
            return
        if self.srtp is not None:
            plain = self.srtp.unprotect(data)
            if plain is None:  # counted in srtp.stats: not from the key holder, replayed, or not SRTP
                return
            data = plain
        now = self.clock()
        if self.first_packet_at is None:
            self.first_packet_at = now
        self._dispatch(self.receiver.receive(data, source, now), now)

    def poll(self, now: float) -> None:
        if not self.ending and self.session is not None:
            self._dispatch(self.receiver.poll(now), now)
            for recorded in self.recorded:
                self._dispatch(recorded.receiver.poll(now), now, recorded.leg)

    def flush_media(self, now: float) -> None:
        """What the jitter buffer still holds goes to the session (which ends the leg's input)."""
        if self.session is not None:
            self._dispatch(self.receiver.flush(), now)
            for recorded in self.recorded:
                self._dispatch(recorded.receiver.flush(), now, recorded.leg)

    def last_media_at(self) -> float:
        """The last packet on any stream: a SIPREC call lives while either party's stream flows."""
        packets = [r.last_packet_at for r in self.receivers() if r.last_packet_at is not None]
        return self.answered_at if not packets else max(max(packets), self.answered_at)

    def set_hold(self, on_hold: bool, now: float) -> None:
        """A re-INVITE held (sendonly, inactive, c=0.0.0.0) or resumed the call."""
        if on_hold and not self.on_hold:
            self.held_since = now
        elif not on_hold:
            self.held_since = None
        self.on_hold = on_hold

    def expired(self, now: float, *, media_timeout: float, hold_timeout: float, max_duration: float) -> str | None:
        """Why the call must end now, or None. Hold only trades the media timeout for the
        (longer) hold timeout: a held call that nobody resumes or hangs up still ends, as does
        every call after ``max_duration`` and one whose session timer ran out."""
        if now - self.answered_at >= max_duration:
            return "max-duration"
        if self.session_expires_at is not None and now >= self.session_expires_at:
            return "session-expired"
        if self.on_hold:
            since = self.answered_at if self.held_since is None else self.held_since
            return "hold-timeout" if now - since >= hold_timeout else None
        return "media-timeout" if now - self.last_media_at() > media_timeout else None

    def _dispatch(self, items: list[AudioChunk | DtmfEvent], now: float, leg: str | None = None) -> None:
        session = self.session
        assert session is not None
        leg = leg or self.leg
        if leg not in session.legs:
            return
        for item in items:
            if isinstance(item, AudioChunk):
                session.feed(leg, item.pcm, now)
            elif isinstance(item, DtmfEvent):
                # the digit's position: RTP timestamp relative to the receiver's timeline is
                # not exposed, so its arrival time in the session (opened at the answer)
                session.dtmf(leg, item.digit, item.duration_ms, now)
