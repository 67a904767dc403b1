"""TCP stream framing."""

from __future__ import annotations

import pytest

from gateway.sip.framing import FramingError, StreamFramer

OPTIONS = (
    b"OPTIONS sip:earshot@198.51.100.7 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 203.0.113.5:40000;branch=z9hG4bKt1\r\n"
    b"From: <sip:pbx@203.0.113.5>;tag=a\r\nTo: <sip:earshot@198.51.100.7>\r\n"
    b"Call-ID: tcp-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 5\r\n\r\nhello"
)


def test_split_and_joined_messages() -> None:
    framer = StreamFramer()
    stream = OPTIONS + b"\r\n\r\n" + OPTIONS.replace(b"tcp-1", b"tcp-2") + OPTIONS[:50]
    # Byte by byte: messages come out exactly when complete.
    out: list[bytes] = []
    for i in range(len(stream)):
        out += framer.feed(stream[i : i + 1])
    assert out == [OPTIONS, OPTIONS.replace(b"tcp-1", b"tcp-2")]
    assert framer.buffered == 50 and framer.pings == 1
    assert framer.feed(OPTIONS[50:]) == [OPTIONS]


def test_compact_and_folded_content_length() -> None:
    framer = StreamFramer()
    msg = OPTIONS.replace(b"Content-Length: 5", b"l:\r\n 5")
    assert framer.feed(msg + msg) == [msg, msg]


def test_keepalive_only() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n\r\n\r\n") == []
    assert framer.pings == 2 and framer.buffered == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (OPTIONS.replace(b"Content-Length: 5\r\n", b""), "Bad Request - Missing Content-Length"),
        (OPTIONS.replace(b"Content-Length: 5", b"Content-Length: -5"), "Bad Request - Invalid Content-Length"),
        (OPTIONS.replace(b"Content-Length: 5", b"Content-Length: 5\r\nl: 6"), "Bad Request - Multiple Content-Length"),
        (OPTIONS.replace(b"Content-Length: 5", b"Content-Length: 999999"), "Bad Request - Message too large"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "Bad Request - Not a SIP message"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "Bad Request - Not a SIP message"),
        (b"OPTIONS sip:x SIP/2.0\r\nX: " + b"a" * 70000, "Bad Request - Message too large"),
    ],
)
def test_framing_errors(data: bytes, reason: str) -> None:
    framer = StreamFramer()
    with pytest.raises(FramingError) as info:
        framer.feed(OPTIONS + data)
    assert info.value.reason == reason
    assert info.value.messages == [OPTIONS]  # what came before the fault is still delivered
    # The stream is dead from then on.
    with pytest.raises(FramingError):
        framer.feed(OPTIONS)


def test_error_carries_head_for_addressing_a_400() -> None:
    framer = StreamFramer()
    bad = OPTIONS.replace(b"Content-Length: 5\r\n", b"")
    with pytest.raises(FramingError) as info:
        framer.feed(bad)
    assert info.value.head.startswith(b"OPTIONS sip:") and b"Call-ID: tcp-1" in info.value.head


def test_max_message_bytes_is_configurable() -> None:
    framer = StreamFramer(max_message_bytes=100)
    with pytest.raises(FramingError):
        framer.feed(OPTIONS)


def test_cr_or_lf_only_stream_is_bounded_and_refused() -> None:
    """Issue 11: CR-only (or LF-only) bytes grew the buffer without bound and were rescanned every read."""
    for byte in (b"\r", b"\n"):
        framer = StreamFramer()
        with pytest.raises(FramingError) as info:
            for _ in range(1000):
                assert framer.feed(byte * 100) == []
                assert framer.buffered == 0 and len(framer._tail) <= 3
        assert info.value.reason == "Bad Request - Line breaks without a message"
        assert framer.pings == 0 and framer.activity == 0


def test_pings_split_across_reads_count_as_activity_and_reset_the_bound() -> None:
    framer = StreamFramer()
    for _ in range(1000):  # far more CR/LF bytes than the bound, all valid pings
        assert framer.feed(b"\r\n\r") == [] and framer.feed(b"\n") == []
    assert framer.pings == 1000 and framer.activity == 1000
    assert framer.feed(OPTIONS) == [OPTIONS] and framer.activity == 1001
