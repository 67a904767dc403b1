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

__all__ = ["DTMF_DIGITS", "DtmfDecoder", "DtmfEvent", "DtmfLimiter"]

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


class DtmfLimiter:
    """Per-call cap on DTMF events: a token bucket of ``per_second`` (burst of as
    many) and at most ``per_call`` events in all; 0 switches a bound off.

    A sender that changes the timestamp of every telephone-event packet makes
    every packet a new event, each one published and stored: without a cap one
    caller can flood the event stream. Events over the cap are counted in
    ``dropped`` and not passed on. Time is the caller's ``now`` (sans-I/O).
    """

    __slots__ = ("per_second", "per_call", "accepted", "dropped", "_tokens", "_at")

    def __init__(self, per_second: float = 20.0, per_call: int = 1000) -> None:
        if per_second < 0 or per_call < 0:
            raise ValueError(f"DTMF limits must be >= 0, got {per_second}/s and {per_call} per call")
        self.per_second = per_second
        self.per_call = per_call
        self.accepted = 0
        self.dropped = 0
        self._tokens = float(per_second)
        self._at: float | None = None

    def allow(self, now: float) -> bool:
        """One event at ``now``: True if it may be published."""
        if self.per_call and self.accepted >= self.per_call:
            self.dropped += 1
            return False
        if self.per_second:
            if self._at is not None and now > self._at:
                self._tokens = min(self.per_second, self._tokens + (now - self._at) * self.per_second)
            self._at = now if self._at is None else max(self._at, now)
            if self._tokens < 1.0:
                self.dropped += 1
                return False
            self._tokens -= 1.0
        self.accepted += 1
        return True
