import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rtp.packet import RtpError, RtpPacket, build_rtp, is_rtcp, parse_rtp


def test_parse_basic_header_fields():
    data = build_rtp(8, 0xBEEF, 0xDEADBEEF, 0x01020304, b"\xd5" * 160, marker=True)
    packet = parse_rtp(data)
    assert packet == RtpPacket(8, 0xBEEF, 0xDEADBEEF, 0x01020304, True, b"\xd5" * 160, 0, None)


def test_parse_matches_hand_built_bytes():
    # Built by hand from RFC 3550 5.1 so build_rtp is not checked against itself.
    data = bytes([0x80, 0x80 | 0, 0x12, 0x34, 0, 0, 0x01, 0x40, 0xCA, 0xFE, 0xBA, 0xBE]) + b"abc"
    packet = parse_rtp(data)
    assert (packet.payload_type, packet.sequence, packet.timestamp, packet.ssrc, packet.marker) == (
        0, 0x1234, 320, 0xCAFEBABE, True,
    )
    assert packet.payload == b"abc"


def test_csrcs_extension_and_padding_are_skipped():
    data = build_rtp(
        0, 1, 2, 3, b"payload!", csrcs=(10, 20, 30), extension=(0xBEDE, b"\x11\x22\x33\x44" * 2), padding=4,
    )
    packet = parse_rtp(data)
    assert packet.payload == b"payload!"
    assert packet.csrc_count == 3
    assert packet.extension_profile == 0xBEDE


def test_padding_only_payload_is_empty():
    packet = parse_rtp(build_rtp(0, 1, 2, 3, b"", padding=1))
    assert packet.payload == b""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated RTP header: 0 bytes"),
        (b"\x80\x00" + bytes(9), "truncated RTP header: 11 bytes"),
        (b"\x40\x00" + bytes(10), "unsupported RTP version 1"),
        (b"\x00\x00" + bytes(10), "unsupported RTP version 0"),
        (b"\x82\x00" + bytes(10) + bytes(4), "truncated CSRC list: 2 CSRCs need 20 bytes, got 16"),
        (b"\x90\x00" + bytes(10) + b"\xbe\xde", "no room for its 4-byte header"),
        (b"\x90\x00" + bytes(10) + b"\xbe\xde\x00\x02" + bytes(4), "2 words declared"),
        (b"\xa0\x00" + bytes(10) + b"xyz\x00", "padding length is 0"),
        (b"\xa0\x00" + bytes(10) + b"xy\x09", "9 padding bytes exceed the 3-byte payload"),
    ],
)
def test_malformed_packets_raise_specific_errors(data, message):
    with pytest.raises(RtpError, match=message):
        parse_rtp(data)


def test_rtp_error_is_a_value_error():
    assert issubclass(RtpError, ValueError)


@pytest.mark.parametrize("packet_type", [200, 201, 202, 203, 204, 205, 206, 207])
def test_rtcp_packet_types_are_demuxed(packet_type):
    # Minimal RTCP header: V=2, count 0, PT, length.
    assert is_rtcp(struct.pack("!BBH", 0x80, packet_type, 1) + bytes(4))


@pytest.mark.parametrize("payload_type", [0, 8, 13, 18, 96, 101, 127])
def test_rtp_is_not_rtcp_with_or_without_marker(payload_type):
    assert not is_rtcp(build_rtp(payload_type, 1, 2, 3, b"x"))
    assert not is_rtcp(build_rtp(payload_type, 1, 2, 3, b"x", marker=True))


def test_is_rtcp_on_garbage():
    assert not is_rtcp(b"")
    assert not is_rtcp(b"\x80")
    assert not is_rtcp(b"\x00\xc8")  # version 0 is neither


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_parse_never_raises_anything_but_rtp_error(data):
    try:
        packet = parse_rtp(data)
    except RtpError:
        return
    assert data[0] >> 6 == 2
    assert len(packet.payload) <= len(data) - 12


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 127), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=64), st.booleans(), st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
    st.one_of(st.none(), st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=12).map(lambda b: b[: len(b) // 4 * 4]))),
    st.integers(0, 255),
)
def test_fuzz_build_parse_roundtrip(pt, seq, ts, ssrc, payload, marker, csrcs, extension, padding):
    packet = parse_rtp(
        build_rtp(pt, seq, ts, ssrc, payload, marker=marker, csrcs=tuple(csrcs), extension=extension, padding=padding)
    )
    assert (packet.payload_type, packet.sequence, packet.timestamp, packet.ssrc, packet.marker) == (pt, seq, ts, ssrc, marker)
    assert packet.payload == payload
    assert packet.csrc_count == len(csrcs)
    assert packet.extension_profile == (extension[0] if extension else None)
