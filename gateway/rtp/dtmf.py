"""RFC 4733 telephone-event decoding: DTMF digits sent as RTP packets.

A sender repeats each event every ~50 ms with a growing duration and the
same RTP timestamp (the event's start), then sends the final packet with the
End bit three times. We emit each event exactly once, at the first End
packet, and recognise the retransmissions by their timestamp. When every End
packet is lost, the event is emitted when the next event starts or on
:meth:`DtmfDecoder.flush`, with the longest duration seen.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from gateway.rtp.packet import RtpPacket

__all__ = ["DTMF_DIGITS", "DtmfDecoder", "DtmfEvent"]

#: Event codes 0-16 (RFC 4733 section 3.2); 16 is hook flash.
DTMF_DIGITS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "*", "#", "A", "B", "C", "D", "flash")


@dataclass(slots=True)
class DtmfEvent:
    digit: str
    duration_ms: int
    #: Power level in -dBm0 (0 loudest .. 63).
    volume: int
    #: RTP timestamp of the event start (raw, as sent).
    timestamp: int


class DtmfDecoder:
    """Turns a stream of telephone-event packets into one :class:`DtmfEvent` per key press.

    Packets with payloads shorter than 4 bytes or event codes other than
    0-16 (other tones) are ignored and counted in ``ignored``.
    """

    __slots__ = ("clock_rate", "ignored", "_current", "_ended", "_emitted")

    def __init__(self, clock_rate: int = 8000) -> None:
        if clock_rate <= 0:
            raise ValueError(f"clock_rate must be positive, got {clock_rate}")
        self.clock_rate = clock_rate
        self.ignored = 0
        # In-progress event not yet emitted: [timestamp, event code, volume, duration].
        self._current: list[int] | None = None
        self._ended = False  # the in-progress event already saw its End bit (emit on next feed)
        # Timestamps of recently emitted events, so retransmitted or late packets
        # of a finished event do not emit it again.
        self._emitted: deque[int] = deque(maxlen=8)

    def feed(self, packet: RtpPacket) -> DtmfEvent | None:
        payload = packet.payload
        if len(payload) < 4 or payload[0] > 16:
            self.ignored += 1
            return None
        timestamp = packet.timestamp
        if timestamp in self._emitted:
            return None
        code, flags, duration = payload[0], payload[1], (payload[2] << 8) | payload[3]
        end, volume = bool(flags & 0x80), flags & 0x3F
        current = self._current
        if current is not None and current[0] == timestamp:
            if duration > current[3]:
                current[3] = duration
            current[2] = volume
            if end or self._ended:
                return self._emit()
            return None
        # A new event: the previous one (its End lost, or an End seen while we
        # were emitting another event) goes out now; this one is emitted at its
        # End, or on the next packet if this packet already is the End.
        previous = self._emit() if current is not None else None
        self._current = [timestamp, code, volume, duration]
        if end:
            if previous is None:
                return self._emit()
            self._ended = True
        return previous

    def flush(self) -> DtmfEvent | None:
        """Emit the event in progress, if any (its End packets never came)."""
        return self._emit() if self._current is not None else None

    def reset(self) -> DtmfEvent | None:
        """Flush, then forget emitted timestamps (the stream changed SSRC)."""
        event = self.flush()
        self._emitted.clear()
        return event

    def _emit(self) -> DtmfEvent:
        timestamp, code, volume, duration = self._current  # type: ignore[misc]
        self._current = None
        self._ended = False
        self._emitted.append(timestamp)
        return DtmfEvent(DTMF_DIGITS[code], duration * 1000 // self.clock_rate, volume, timestamp)
