"""One answered call: its SIP dialog, RTP socket, receiver and leg pipeline.

The gateway owns the life cycle (answer, re-INVITE, end); this class holds the
per-call state and moves RTP datagrams into the pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from .events import DTMF, Event, EventFactory
from .sdp import SessionDescription
from .pipeline import LegPipeline
from .rtp.dtmf import DtmfEvent
from .rtp.receiver import AudioChunk, RtpReceiver
from .rtp.transport import RtpSocket

log = logging.getLogger(__name__)


@dataclass
class Call:
    call_id: str
    dialog_id: str
    events: EventFactory
    receiver: RtpReceiver
    pipeline: LegPipeline
    publish: Callable[[Event], None]
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
    dtmf_count: int = 0
    clock: Callable[[], float] = field(default=lambda: 0.0)

    def origin_ms(self) -> float:
        """Where the leg's sample 0 (first RTP packet) sits in the call, in ms."""
        if self.first_packet_at is None:
            return 0.0
        return (self.first_packet_at - self.answered_at) * 1000.0

    def on_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        if self.ending:
            return
        now = self.clock()
        if self.first_packet_at is None:
            self.first_packet_at = now
        self._dispatch(self.receiver.receive(data, source, now), now)

    def poll(self, now: float) -> None:
        if not self.ending:
            self._dispatch(self.receiver.poll(now), now)

    def flush_media(self, now: float) -> None:
        self._dispatch(self.receiver.flush(), now)
        self.pipeline.finish_input(now)

    def last_media_at(self) -> float:
        last = self.receiver.last_packet_at
        return self.answered_at if last is None else max(last, self.answered_at)

    def _dispatch(self, items: list[AudioChunk | DtmfEvent], now: float) -> None:
        for item in items:
            if isinstance(item, AudioChunk):
                self.pipeline.feed_audio(item.pcm, now)
            elif isinstance(item, DtmfEvent):
                self.dtmf_count += 1
                # the digit's position: RTP timestamp relative to the receiver's timeline is
                # not exposed, so use arrival time relative to the answer
                offset_ms = round((now - self.answered_at) * 1000.0)
                self.publish(self.events.make(DTMF, {
                    "digit": item.digit,
                    "duration_ms": item.duration_ms,
                    "offset_ms": offset_ms,
                }, leg=self.pipeline.leg))
