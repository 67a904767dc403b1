"""Per-call RTP receiver (sans-I/O): datagrams in, decoded audio and DTMF out.

One :class:`RtpReceiver` per call. The transport hands it every datagram
that reaches the call's RTP port with the source address and the current
monotonic time; it returns :class:`AudioChunk` objects (8 kHz 16-bit PCM on a
gap-free call timeline) and :class:`~gateway.rtp.dtmf.DtmfEvent` objects.

Network input never raises: malformed datagrams, RTCP on the RTP port
(rtcp-mux), packets from foreign sources and unknown payload types are
counted in :attr:`RtpReceiver.stats` and dropped.

Symmetric RTP latching: the first valid packet whose source IP equals the
SDP connection address (or the SIP peer's address) fixes the remote (IP,
port); the port is not checked against the SDP because NATs rewrite it.
``latch="strict"`` (the default) never latches anywhere else, so a foreign
sender that is quicker than a late legitimate source cannot take the call's
media; ``latch="any"`` also takes a foreign source once only such sources
have sent for ``latch_grace`` seconds. With an unspecified SDP address
(0.0.0.0, ::) the SIP peer's address is required in strict mode when it is
known, else the first source wins.

Audio out is bounded by wall-clock time: the call timeline never runs more
than :data:`MAX_LEAD` seconds (plus :data:`MAX_DRIFT` of the elapsed time)
ahead of the time since the first packet. A sender that sends faster than
real time or advances its timestamps by seconds per packet gets what fits,
and the rest is counted in ``stats.overrun`` (samples) and dropped, so one
caller cannot make the gateway buffer and transcribe hours of audio.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from gateway.media import g711
from gateway.rtp.dtmf import DtmfDecoder, DtmfEvent, DtmfLimiter
from gateway.rtp.jitter import Frame, JitterBuffer
from gateway.rtp.packet import RtpError, RtpPacket, parse_rtp

__all__ = ["AudioChunk", "ReceiverStats", "RtpReceiver"]

_UNSPECIFIED = frozenset({"", "0.0.0.0", "::", "0:0:0:0:0:0:0:0"})
_MISSING = object()
#: Static payload type of comfort noise (RFC 3389), accepted even if not negotiated.
CN_PAYLOAD_TYPE = 13
#: Wall-clock pause between two SSRCs beyond which the pause becomes silence.
SSRC_GAP = 0.1
#: Packets of the previous SSRC arriving this soon after a switch are late stragglers.
_STRAGGLER_WINDOW = 0.5
#: Seconds the call timeline may run ahead of wall-clock time since the first packet
#: (a packet's own duration, network jitter, a burst after a stall).
MAX_LEAD = 1.0
#: Sender clocks may run this much fast (a fraction of elapsed time) before audio is dropped.
MAX_DRIFT = 0.01
#: A timestamp gap may exceed the arrival-time difference by this plus the jitter delay.
GAP_SLACK = 0.25
LATCH_MODES = ("strict", "any")


@dataclass(slots=True)
class AudioChunk:
    #: 16-bit signed little-endian mono PCM at 8 kHz, silence where nothing was received.
    pcm: bytes
    #: Position of the first sample on the call timeline (8 kHz samples since the first packet).
    start_sample: int
    #: Samples of this chunk that are synthesized silence (loss, DTX, comfort noise, SSRC pause).
    lost_samples: int


@dataclass(slots=True)
class ReceiverStats:
    packets: int = 0
    bytes: int = 0
    lost_packets: int = 0
    late: int = 0
    duplicates: int = 0
    reordered: int = 0
    foreign_dropped: int = 0
    malformed: int = 0
    unknown_payload: int = 0
    ssrc_changes: int = 0
    rtcp: int = 0
    resyncs: int = 0
    #: Samples dropped because the timeline would have run ahead of wall-clock time.
    overrun: int = 0
    #: DTMF events over the per-call rate or total cap: not passed on.
    dtmf_dropped: int = 0


def _normalize_host(host: str | None) -> str:
    """Canonical text of an IP address (IPv4-mapped IPv6 unwrapped); other names unchanged."""
    if not host:
        return ""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


class RtpReceiver:
    __slots__ = (
        "clock_rate", "latched", "last_packet_at", "_stats", "_jitter", "_dtmf",
        "_expected_host", "_expected_port", "_any_host", "_decoders", "_dtmf_pt",
        "_ssrc", "_previous_ssrc", "_switched_at", "_position", "_stragglers",
        "_signalling_host", "_latch_grace", "_foreign_since", "_latch_any", "_started_at", "_now",
        "_dtmf_limit",
    )

    def __init__(
        self,
        *,
        expected_host: str,
        expected_port: int | None,
        codecs: dict[int, str],
        dtmf_payload_type: int | None,
        clock_rate: int = 8000,
        jitter_delay: float = 0.06,
        signalling_host: str | None = None,
        latch_grace: float = 1.0,
        latch: str = "strict",
        dtmf_per_second: float = 20.0,
        dtmf_per_call: int = 1000,
    ) -> None:
        """``signalling_host``: the SIP peer's address, also accepted for latching (a peer
        behind NAT advertises a private address in SDP but sends from the same public
        address as its SIP). ``latch="any"``: if for ``latch_grace`` seconds only sources
        matching neither have sent valid RTP, the receiver latches to such a source rather
        than lose the call's audio; ``"strict"`` never does. ``dtmf_per_second`` and
        ``dtmf_per_call`` cap the DTMF events passed on (:class:`DtmfLimiter`)."""
        if latch not in LATCH_MODES:
            raise ValueError(f"latch must be one of {', '.join(LATCH_MODES)}, got {latch!r}")
        self._latch_any = latch == "any"
        self._started_at: float | None = None  # ``now`` of the first accepted packet
        self._now = 0.0  # latest ``now`` seen
        self.clock_rate = clock_rate
        self._signalling_host = _normalize_host(signalling_host) if signalling_host else None
        self._latch_grace = latch_grace
        self._foreign_since: float | None = None
        #: Remote (IP, port) media is accepted from, once the first valid packet fixed it.
        self.latched: tuple[str, int] | None = None
        #: ``now`` of the last accepted RTP packet (for media-timeout detection).
        self.last_packet_at: float | None = None
        self._stats = ReceiverStats()
        self._jitter = JitterBuffer(clock_rate, jitter_delay, gap_slack=GAP_SLACK + jitter_delay)
        self._dtmf = DtmfDecoder(clock_rate)
        self._dtmf_limit = DtmfLimiter(dtmf_per_second, dtmf_per_call)
        self._ssrc: int | None = None
        self._previous_ssrc: int | None = None
        self._switched_at = 0.0
        self._position = 0  # next sample position on the call timeline
        self._stragglers = 0
        self._configure(expected_host, expected_port, codecs, dtmf_payload_type)

    # -- configuration -------------------------------------------------------

    def _configure(
        self,
        expected_host: str,
        expected_port: int | None,
        codecs: dict[int, str],
        dtmf_payload_type: int | None,
    ) -> None:
        decoders: dict[int, Callable[[bytes], bytes] | None] = {}
        for pt, name in codecs.items():
            if not 0 <= pt <= 127:
                raise ValueError(f"payload type {pt} out of range 0..127")
            encoding = name.split("/", 1)[0].upper()  # accept SDP rtpmap text like "PCMU/8000"
            if encoding in g711.CODECS:
                decoders[pt] = g711.decoder(encoding)
            elif encoding == "CN":
                decoders[pt] = None
            elif encoding == "TELEPHONE-EVENT":
                if dtmf_payload_type is None:
                    dtmf_payload_type = pt
            else:
                raise ValueError(f"unsupported codec {name!r} for payload type {pt}: expected PCMU, PCMA, CN or telephone-event")
        decoders.setdefault(CN_PAYLOAD_TYPE, None)
        if dtmf_payload_type is not None:
            if not 0 <= dtmf_payload_type <= 127:
                raise ValueError(f"DTMF payload type {dtmf_payload_type} out of range 0..127")
            decoders.pop(dtmf_payload_type, None)
        self._decoders = decoders
        self._dtmf_pt = dtmf_payload_type
        self._expected_host = _normalize_host(expected_host)
        self._expected_port = expected_port
        self._any_host = self._expected_host in _UNSPECIFIED and (self._latch_any or not self._signalling_host)

    def update(
        self,
        *,
        expected_host: str,
        expected_port: int | None,
        codecs: dict[int, str],
        dtmf_payload_type: int | None,
    ) -> None:
        """Apply a re-INVITE: new codecs and/or remote; re-latch if the remote address changed."""
        old = (self._expected_host, self._expected_port)
        self._configure(expected_host, expected_port, codecs, dtmf_payload_type)
        if (self._expected_host, self._expected_port) != old:
            self.latched = None
            self._foreign_since = None

    @property
    def stats(self) -> ReceiverStats:
        stats, jitter = self._stats, self._jitter.stats
        stats.lost_packets = jitter.lost
        stats.late = jitter.late + self._stragglers
        stats.duplicates = jitter.duplicate
        stats.reordered = jitter.reordered
        stats.resyncs = jitter.resyncs
        return stats

    @property
    def position(self) -> int:
        """Samples on the call timeline so far (start_sample of the next chunk)."""
        return self._position

    # -- datagrams in ------------------------------------------------------

    def receive(self, data: bytes, source: tuple[str, int], now: float) -> list[AudioChunk | DtmfEvent]:
        stats = self._stats
        stats.packets += 1
        stats.bytes += len(data)
        self._now = now
        latched = self.latched
        if latched is not None and (source[1] != latched[1] or source[0] != latched[0]):
            stats.foreign_dropped += 1
            return []
        if len(data) >= 2 and 192 <= data[1] <= 223 and data[0] >> 6 == 2:  # rtcp-mux (is_rtcp inlined)
            stats.rtcp += 1
            return []
        try:
            packet = parse_rtp(data)
        except RtpError:
            stats.malformed += 1
            return []
        pt = packet.payload_type
        decoder = self._decoders.get(pt, _MISSING)
        is_dtmf = pt == self._dtmf_pt
        if decoder is _MISSING and not is_dtmf:
            stats.unknown_payload += 1
            return []
        if latched is None:
            host = source[0]
            if not (self._any_host or host == self._expected_host or host == self._signalling_host):
                host = _normalize_host(host)
                if not (host == self._expected_host or host == self._signalling_host):
                    if self._foreign_since is None:
                        self._foreign_since = now
                    if not self._latch_any or now - self._foreign_since < self._latch_grace:
                        stats.foreign_dropped += 1
                        return []
            self.latched = (source[0], source[1])
            if self._started_at is None:
                self._started_at = now
        out: list[AudioChunk | DtmfEvent] = []
        if packet.ssrc != self._ssrc:
            if self._ssrc is not None:
                if packet.ssrc == self._previous_ssrc and now - self._switched_at < _STRAGGLER_WINDOW:
                    self._stragglers += 1
                    return out
                self._change_ssrc(packet, now, out)
            self._ssrc = packet.ssrc
        self.last_packet_at = now
        if is_dtmf:  # short or non-DTMF events are ignored (and counted) by the decoder
            event = self._dtmf.feed(packet)
            if event is not None:
                self._dtmf_out(event, now, out)
            frames = self._jitter.push(packet, now, 0)  # holds its sequence number only
        elif decoder is None:  # comfort noise: the timestamp gap it leaves becomes silence
            frames = self._jitter.push(packet, now, 0)
        else:
            frames = self._jitter.push(packet, now)
        if frames:
            self._decode(frames, out)
        return out

    def poll(self, now: float) -> list[AudioChunk | DtmfEvent]:
        """Release audio held behind a gap that waited long enough; call every ~20 ms."""
        out: list[AudioChunk | DtmfEvent] = []
        self._now = max(self._now, now)
        frames = self._jitter.poll(now)
        if frames:
            self._decode(frames, out)
        return out

    def flush(self) -> list[AudioChunk | DtmfEvent]:
        """Release everything held (end of call)."""
        out: list[AudioChunk | DtmfEvent] = []
        self._decode(self._jitter.flush(), out)
        event = self._dtmf.flush()
        if event is not None:
            self._dtmf_out(event, self._now, out)
        return out

    # -- internals ---------------------------------------------------------

    def _change_ssrc(self, packet: RtpPacket, now: float, out: list[AudioChunk | DtmfEvent]) -> None:
        """Close the old stream and continue the timeline for the new one without overlap."""
        self._stats.ssrc_changes += 1
        self._decode(self._jitter.flush(), out)
        event = self._dtmf.reset()
        if event is not None:
            self._dtmf_out(event, now, out)
        self._previous_ssrc = self._ssrc
        self._switched_at = now
        if self.last_packet_at is not None and now - self.last_packet_at > SSRC_GAP:
            # The new packet arrives at the end of its own audio: the pause is
            # the wall-clock gap minus that packet's duration.
            samples = len(packet.payload) if packet.payload_type in self._decoders else 0
            gap = min(round((now - self.last_packet_at) * self.clock_rate) - samples, self._jitter.max_gap,
                      self._room())
            if gap > 0:
                out.append(AudioChunk(bytes(2 * gap), self._position, gap))
                self._position += gap

    def _dtmf_out(self, event: DtmfEvent, now: float, out: list[AudioChunk | DtmfEvent]) -> None:
        if self._dtmf_limit.allow(now):
            out.append(event)
        else:
            self._stats.dtmf_dropped += 1

    def _room(self) -> int:
        """Samples the timeline may still grow by before it runs ahead of wall-clock time."""
        if self._started_at is None:
            return 0
        elapsed = self._now - self._started_at
        limit = round((elapsed * (1.0 + MAX_DRIFT) + MAX_LEAD) * self.clock_rate)
        return limit - self._position

    def _decode(self, frames: list[Frame], out: list[AudioChunk | DtmfEvent]) -> None:
        decoders = self._decoders
        room = self._room()
        for frame in frames:
            samples = frame.samples
            if samples > room:  # ahead of wall-clock time: keep what fits, drop the rest
                self._stats.overrun += samples - max(room, 0)
                samples = room
                if samples <= 0:
                    continue
            room -= samples
            payload = frame.payload
            decoder = decoders.get(frame.payload_type) if payload is not None else None
            if decoder is None:  # gap, or a payload type a re-INVITE removed meanwhile
                out.append(AudioChunk(bytes(2 * samples), self._position, samples))
            else:
                pcm = decoder(payload)
                out.append(AudioChunk(pcm if samples == frame.samples else pcm[:2 * samples], self._position, 0))
            self._position += samples
