"""One answered call: its SIP dialog, RTP socket and receiver, and the session they feed.

The gateway owns the life cycle (answer, re-INVITE, end); this class holds the
per-call SIP and RTP state and moves decoded RTP audio and digits into the call's
:class:`~gateway.session.Session` (one leg), as every other ingest does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from .sdp import SessionDescription
from .rtp.dtmf import DtmfEvent
from .rtp.receiver import AudioChunk, RtpReceiver
from .rtp.transport import RtpSocket
from .session import Session

log = logging.getLogger(__name__)


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
    confirmed: bool = False
    ending: bool = False
    first_packet_at: float | None = None
    sdp_version: int = 1
    session: Session | None = None  # opened when the call is answered
    clock: Callable[[], float] = field(default=lambda: 0.0)

    def origin_ms(self) -> float:
        """Where the leg's sample 0 (first RTP packet) sits in the call, in ms."""
        if self.first_packet_at is None:
            return 0.0
        return (self.first_packet_at - self.answered_at) * 1000.0

    def on_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        if self.ending or self.session is None:
            return
        now = self.clock()
        if self.first_packet_at is None:
            self.first_packet_at = now
        self._dispatch(self.receiver.receive(data, source, now), now)

    def poll(self, now: float) -> None:
        if not self.ending and self.session is not None:
            self._dispatch(self.receiver.poll(now), now)

    def flush_media(self, now: float) -> None:
        """What the jitter buffer still holds goes to the session (which ends the leg's input)."""
        if self.session is not None:
            self._dispatch(self.receiver.flush(), now)

    def last_media_at(self) -> float:
        last = self.receiver.last_packet_at
        return self.answered_at if last is None else max(last, self.answered_at)

    def _dispatch(self, items: list[AudioChunk | DtmfEvent], now: float) -> None:
        session = self.session
        assert session is not None
        for item in items:
            if isinstance(item, AudioChunk):
                session.feed(self.leg, item.pcm, now)
            elif isinstance(item, DtmfEvent):
                # the digit's position: RTP timestamp relative to the receiver's timeline is
                # not exposed, so its arrival time in the session (opened at the answer)
                session.dtmf(self.leg, item.digit, item.duration_ms, now)
