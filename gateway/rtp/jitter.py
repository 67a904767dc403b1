"""Jitter buffer: turn RTP packets as they arrive into an ordered, gap-free timeline.

The output is a sequence of :class:`Frame` objects whose timestamps are
contiguous: every sample of the call is either a received payload or an
explicit gap (``payload=None``) that the caller fills with silence. Keeping
the timeline exact matters more than hiding loss, because transcript offsets
are computed from it.

Design choices, all for a 2-core box carrying 25,000 packets/s:

* Packets that arrive in order with nothing buffered are released at once
  without touching the dict (the common case costs a few integer ops).
* A gap waits at most ``max_delay`` seconds, measured from the arrival of
  the first packet after it, then is declared lost. The clock is the ``now``
  the caller passes in (sans-I/O), so :meth:`JitterBuffer.poll` must be
  called periodically to release frames when no packet arrives.
* Timestamp gaps without sequence gaps (DTX, comfort noise, DTMF pauses) are
  filled like losses. A gap that is negative or longer than ``max_gap``
  seconds is treated as a sender timestamp reset: the timeline continues
  where it was (no fill), counted in ``stats.resyncs``.
* With ``gap_slack`` set, the sender's timestamps are not trusted further
  than the arrival times: a gap is filled only if that much time passed
  between the two packets' arrivals (plus the slack). A larger jump is a
  resync that fills just the time that really passed, so a sender that
  advances its timestamp seconds per packet cannot make the buffer
  synthesize seconds of silence per packet.
* A sequence number far outside the window (RFC 3550 A.1 style
  MAX_DROPOUT/MAX_MISORDER) is held on probation and only accepted (resync)
  when a neighbour confirms it, so a single stray packet cannot derail a call.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.rtp.packet import RtpPacket

__all__ = ["Frame", "JitterBuffer", "JitterStats"]

_TS_MASK = 0xFFFFFFFF
_TS_HALF = 0x80000000
_SEQ_MASK = 0xFFFF
_HISTORY_MASK = (1 << 64) - 1
#: Sequence jumps beyond these (in packets) are resyncs, not loss/lateness.
MAX_DROPOUT = 3000
MAX_MISORDER = 100
#: Two off-window packets at most this far apart confirm a sequence jump.
_PROBATION_WINDOW = 16


@dataclass(slots=True)
class Frame:
    """A span of the call timeline.

    ``timestamp`` is unwrapped (a plain int that keeps growing across the
    32-bit wrap). ``payload`` None means nothing was received for these
    ``samples`` (loss, DTX, comfort noise): the caller fills silence.
    """

    timestamp: int
    samples: int
    payload: bytes | None
    payload_type: int


@dataclass(slots=True)
class JitterStats:
    received: int = 0
    #: Sequence numbers declared missing (a later arrival still counts as late).
    lost: int = 0
    #: Arrived after their slot was released (played or declared lost): dropped.
    late: int = 0
    duplicate: int = 0
    #: Arrived after a higher sequence number but in time to be played.
    reordered: int = 0
    #: Sequence or timestamp discontinuities the timeline was re-anchored over.
    resyncs: int = 0
    #: Off-window packets never confirmed by a neighbour: dropped.
    stray: int = 0


class JitterBuffer:
    """Reorders one RTP stream and releases it as a contiguous timeline.

    ``push`` takes an optional ``samples`` count (default: one sample per
    payload byte, i.e. G.711 at 8 kHz). Pass ``samples=0`` for packets that
    carry no audio (RFC 4733 events, comfort noise): they hold their
    sequence number, so they are not mistaken for loss, but produce no frame;
    the timestamp gap they leave is filled at the next audio packet.
    """

    __slots__ = (
        "clock_rate", "max_delay", "max_packets", "max_gap", "stats",
        "_buffer", "_started", "_next_seq", "_highest", "_next_ts", "_ts_shift",
        "_anchor", "_fresh", "_history", "_probation", "gap_slack", "_last_at",
    )

    def __init__(
        self,
        clock_rate: int = 8000,
        max_delay: float = 0.06,
        max_packets: int = 64,
        max_gap: float = 5.0,
        gap_slack: float | None = None,
    ) -> None:
        if clock_rate <= 0:
            raise ValueError(f"clock_rate must be positive, got {clock_rate}")
        if max_delay < 0:
            raise ValueError(f"max_delay must be >= 0, got {max_delay}")
        if max_packets < 1:
            raise ValueError(f"max_packets must be >= 1, got {max_packets}")
        if gap_slack is not None and gap_slack < 0:
            raise ValueError(f"gap_slack must be >= 0, got {gap_slack}")
        self.clock_rate = clock_rate
        self.max_delay = max_delay
        self.max_packets = max_packets
        self.max_gap = int(max_gap * clock_rate)
        #: Samples a gap may exceed the arrival-time difference by; None: timestamps are trusted.
        self.gap_slack = None if gap_slack is None else int(gap_slack * clock_rate)
        self._last_at: float | None = None  # arrival time of the last audio packet placed
        self.stats = JitterStats()
        # extended sequence number -> (packet, samples, arrival time)
        self._buffer: dict[int, tuple[RtpPacket, int, float]] = {}
        self._started = False
        self._next_seq = 0  # extended sequence number of the next slot to release
        self._highest = 0  # highest extended sequence number accepted
        self._next_ts = 0  # timeline position where the next audio frame starts
        self._ts_shift = 0  # raw RTP timestamp minus timeline timestamp, mod 2**32
        self._anchor = True  # next audio frame (re)anchors the timeline
        self._fresh = True  # timeline empty: anchor at the packet's own timestamp
        self._history = 0  # bit i set: slot next_seq-1-i was played from a real packet
        self._probation: tuple[RtpPacket, int, float] | None = None

    @property
    def end_timestamp(self) -> int:
        """Timeline position just after the last released sample."""
        return self._next_ts

    @property
    def held(self) -> int:
        """Packets waiting behind a gap."""
        return len(self._buffer)

    def push(self, packet: RtpPacket, now: float, samples: int | None = None) -> list[Frame]:
        """Accept one packet; return the frames that became playable, in order."""
        self.stats.received += 1
        if samples is None:
            samples = len(packet.payload)
        out: list[Frame] = []
        if not self._started:
            self._start(packet.sequence)
        delta = (packet.sequence - self._next_seq) & _SEQ_MASK
        if delta >= 0x8000:
            delta -= 0x10000
        if delta == 0 and not self._buffer:  # fast path: in order, nothing held
            if self._probation is not None:
                self._probation_reset()
            self._emit(packet, samples, out, now)
            self._next_seq += 1
            self._highest = self._next_seq - 1
            self._history = ((self._history << 1) | 1) & _HISTORY_MASK
            return out
        if delta > MAX_DROPOUT or delta < -MAX_MISORDER:
            self._jump(packet, samples, now, out)
            return out
        self._probation_reset()
        if delta < 0:
            back = -delta
            if back <= 64 and (self._history >> (back - 1)) & 1:
                self.stats.duplicate += 1
            else:
                self.stats.late += 1
            return out
        ext = self._next_seq + delta
        if ext in self._buffer:
            self.stats.duplicate += 1
            return out
        if ext < self._highest:
            self.stats.reordered += 1
        else:
            self._highest = ext
        self._buffer[ext] = (packet, samples, now)
        if delta == 0:
            self._release_run(out)
        while len(self._buffer) > self.max_packets:
            self._skip_gap(out)
        if self._buffer:
            self._expire(now, out)
        return out

    def poll(self, now: float) -> list[Frame]:
        """Release frames held behind a gap that has been waited for long enough."""
        out: list[Frame] = []
        if self._buffer:
            self._expire(now, out)
        return out

    def flush(self) -> list[Frame]:
        """Release everything held (gaps declared lost) and end this sequence.

        The next packet starts a new sequence whose audio continues the
        timeline at :attr:`end_timestamp` (SSRC change, end of call).
        """
        out: list[Frame] = []
        while self._buffer:
            self._skip_gap(out)
        self._probation_reset()
        self._started = False
        self._anchor = True
        self._history = 0
        return out

    # -- internals ---------------------------------------------------------

    def _start(self, sequence: int) -> None:
        self._started = True
        self._next_seq = sequence
        self._highest = sequence - 1

    def _emit(self, packet: RtpPacket, samples: int, out: list[Frame], at: float) -> None:
        """Place an audio packet (arrived at ``at``) on the timeline, filling any gap before it."""
        if samples <= 0:
            return
        last_at, self._last_at = self._last_at, at
        if self._anchor:
            if self._fresh:
                self._next_ts = packet.timestamp
                self._fresh = False
            self._ts_shift = (packet.timestamp - self._next_ts) & _TS_MASK
            self._anchor = False
        next_ts = self._next_ts
        gap = (((packet.timestamp - self._ts_shift - next_ts) & _TS_MASK) ^ _TS_HALF) - _TS_HALF
        if gap:
            fill = gap if 0 < gap <= self.max_gap else 0  # else a timestamp reset or absurd jump
            if self.gap_slack is not None and last_at is not None:
                # a packet arrives when its last sample was sent: the time that passed
                # since the previous one's arrival covers the gap and this packet
                passed = round((at - last_at) * self.clock_rate) - samples
                if fill != gap or gap > passed + self.gap_slack:
                    fill = min(max(passed, 0), self.max_gap)
            if fill != gap:
                self.stats.resyncs += 1
                self._ts_shift = (packet.timestamp - next_ts - fill) & _TS_MASK
            if fill:
                out.append(Frame(next_ts, fill, None, packet.payload_type))
                next_ts += fill
        out.append(Frame(next_ts, samples, packet.payload, packet.payload_type))
        self._next_ts = next_ts + samples

    def _release_run(self, out: list[Frame]) -> None:
        buffer = self._buffer
        while self._next_seq in buffer:
            packet, samples, at = buffer.pop(self._next_seq)
            self._emit(packet, samples, out, at)
            self._next_seq += 1
            self._history = ((self._history << 1) | 1) & _HISTORY_MASK

    def _skip_gap(self, out: list[Frame]) -> None:
        """Declare the slots before the first held packet lost and release from there."""
        first = min(self._buffer)
        missing = first - self._next_seq
        self.stats.lost += missing
        self._history = (self._history << missing) & _HISTORY_MASK if missing < 64 else 0
        self._next_seq = first
        self._release_run(out)

    def _expire(self, now: float, out: list[Frame]) -> None:
        buffer = self._buffer
        while buffer:
            first = min(buffer)
            if now - buffer[first][2] < self.max_delay:
                return
            self._skip_gap(out)

    def _jump(self, packet: RtpPacket, samples: int, now: float, out: list[Frame]) -> None:
        """Handle a packet far outside the sequence window."""
        held = self._probation
        if held is not None:
            distance = (packet.sequence - held[0].sequence) & _SEQ_MASK
            if distance >= 0x8000:
                distance -= 0x10000
            if distance and -_PROBATION_WINDOW <= distance <= _PROBATION_WINDOW:
                # Confirmed: the sender really jumped. Play out the old sequence,
                # then restart at the earlier of the two packets.
                self._probation = None
                while self._buffer:
                    self._skip_gap(out)
                self.stats.resyncs += 1
                first, second = (held, (packet, samples, now)) if distance > 0 else ((packet, samples, now), held)
                self._start(first[0].sequence)
                self._history = 0
                base = self._next_seq
                self._highest = base + abs(distance)
                self._buffer[base] = first
                self._buffer[base + abs(distance)] = second
                self._release_run(out)
                return
            self.stats.stray += 1
        self._probation = (packet, samples, now)

    def _probation_reset(self) -> None:
        if self._probation is not None:
            self._probation = None
            self.stats.stray += 1
