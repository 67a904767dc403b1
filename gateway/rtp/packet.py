"""RTP packets (RFC 3550): parse, build, and tell RTP from multiplexed RTCP.

Parsing is on the hot path (every packet of every call), so it is one
``struct`` unpack plus slicing, and every way a datagram can be malformed
raises :class:`RtpError` with a message that says which way: callers count
and drop, they never crash on network input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["RtpError", "RtpPacket", "build_rtp", "is_rtcp", "parse_rtp"]

_HEADER = struct.Struct("!BBHII")
_HEADER_SIZE = 12
_EXTENSION = struct.Struct("!HH")


class RtpError(ValueError):
    """A datagram that is not a well-formed RTP packet."""


@dataclass(slots=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    marker: bool
    payload: bytes
    csrc_count: int = 0
    #: Profile id of the header extension (RFC 3550 5.3.1), None when absent.
    #: The extension body is skipped: nothing downstream uses it.
    extension_profile: int | None = None


def parse_rtp(data: bytes) -> RtpPacket:
    """Parse one RTP datagram; raise :class:`RtpError` on anything malformed."""
    size = len(data)
    if size < _HEADER_SIZE:
        raise RtpError(f"truncated RTP header: {size} bytes, need 12")
    b0, b1, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
    if b0 >> 6 != 2:
        raise RtpError(f"unsupported RTP version {b0 >> 6}, expected 2")
    csrc_count = b0 & 0x0F
    offset = _HEADER_SIZE + 4 * csrc_count
    if offset > size:
        raise RtpError(f"truncated CSRC list: {csrc_count} CSRCs need {offset} bytes, got {size}")
    profile = None
    if b0 & 0x10:
        if offset + 4 > size:
            raise RtpError("truncated header extension: no room for its 4-byte header")
        profile, words = _EXTENSION.unpack_from(data, offset)
        offset += 4 + 4 * words
        if offset > size:
            raise RtpError(f"truncated header extension: {words} words declared, packet is {size} bytes")
    end = size
    if b0 & 0x20:
        padding = data[-1]
        if padding == 0:
            raise RtpError("invalid padding: padding bit set but padding length is 0")
        end -= padding
        if end < offset:
            raise RtpError(f"invalid padding: {padding} padding bytes exceed the {size - offset}-byte payload")
    return RtpPacket(b1 & 0x7F, sequence, timestamp, ssrc, b1 > 0x7F, data[offset:end], csrc_count, profile)


def is_rtcp(data: bytes) -> bool:
    """True when a datagram on the RTP port is RTCP (rtcp-mux, RFC 5761 section 4).

    RTCP packet types 192-223 sit where an RTP header has marker + payload
    type 64-95, a range RFC 5761 forbids for RTP when muxing, so byte 1 alone
    decides (SR=200, RR=201, SDES=202, BYE=203, APP=204, RTPFB/PSFB=205/206,
    XR=207).
    """
    return len(data) >= 2 and data[0] >> 6 == 2 and 192 <= data[1] <= 223


def build_rtp(
    payload_type: int,
    sequence: int,
    timestamp: int,
    ssrc: int,
    payload: bytes = b"",
    *,
    marker: bool = False,
    csrcs: tuple[int, ...] = (),
    extension: tuple[int, bytes] | None = None,
    padding: int = 0,
) -> bytes:
    """Serialize an RTP packet (for tests, benchmarks and test senders).

    ``extension`` is ``(profile, body)`` with ``len(body)`` a multiple of 4;
    ``padding`` is the total number of padding bytes (including the count byte).
    """
    if len(csrcs) > 15:
        raise ValueError("at most 15 CSRCs")
    if not 0 <= padding <= 255:
        raise ValueError("padding must be 0..255 bytes")
    b0 = 0x80 | len(csrcs) | (0x10 if extension is not None else 0) | (0x20 if padding else 0)
    b1 = (payload_type & 0x7F) | (0x80 if marker else 0)
    parts = [_HEADER.pack(b0, b1, sequence & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc & 0xFFFFFFFF)]
    parts.extend(struct.pack("!I", csrc) for csrc in csrcs)
    if extension is not None:
        profile, body = extension
        if len(body) % 4:
            raise ValueError("header extension body must be a multiple of 4 bytes")
        parts.append(_EXTENSION.pack(profile, len(body) // 4))
        parts.append(body)
    parts.append(payload)
    if padding:
        parts.append(bytes(padding - 1) + bytes([padding]))
    return b"".join(parts)
