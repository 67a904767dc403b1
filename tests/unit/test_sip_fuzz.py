"""Fuzzing the UserAgent: nothing may raise, and nothing may hit the
internal-error safety net.

``receive()`` deliberately catches every exception (a bug must not take the
listener down), so "no exception" alone would prove nothing.  These tests
also fail on the safety net's traces: a ``MalformedMessage("Internal error")``
event or an ERROR log record from the SIP core, caught only while the example runs
(so what other tests log cannot fail these).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.sip.events import IncomingCall, MalformedMessage, Peer, ReInvite
from gateway.sip.framing import FramingError, StreamFramer
from gateway.sip.useragent import UserAgent

PEER = Peer("udp", "203.0.113.5", 5062)
OFFER = b"v=0\r\no=- 1 1 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\n"


def message(method: str, branch: str, cseq: int, to_tag: str = "", body: bytes = b"", call_id: str = "fz-1") -> bytes:
    to = "<sip:earshot@198.51.100.7>" + (f";tag={to_tag}" if to_tag else "")
    head = (
        f"{method} sip:earshot@198.51.100.7 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 203.0.113.5:5062;branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        'From: "Fuzz" <sip:fuzz@203.0.113.5>;tag=f1\r\n'
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        "Contact: <sip:fuzz@203.0.113.5:5062>\r\n"
        + ("Content-Type: application/sdp\r\n" if body else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def response(status: int, branch: str, method: str = "BYE") -> bytes:
    return (
        f"SIP/2.0 {status} Whatever\r\nVia: SIP/2.0/UDP 198.51.100.7:5060;branch={branch}\r\n"
        "From: <sip:earshot@198.51.100.7>;tag=a\r\nTo: <sip:fuzz@203.0.113.5>;tag=f1\r\n"
        f"Call-ID: fz-1\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


class ErrorCatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


#: the loggers under gateway.sip that the user agent and its transport log to
SIP_LOGGERS = ("gateway.sip.useragent", "gateway.sip.transport")


@contextlib.contextmanager
def sip_errors() -> Iterator[list[logging.LogRecord]]:
    """The ERROR records logged under ``gateway.sip`` while the block runs, and only those.

    Used per Hypothesis example rather than as a fixture: a function-scoped fixture is
    shared by all examples of a test, so records of one failing example would make
    every later one fail too and shrinking would report a meaningless input.
    """
    logger = logging.getLogger("gateway.sip")
    for name in SIP_LOGGERS:  # a raised level or logging.disable() would make this pass vacuously
        assert logging.getLogger(name).isEnabledFor(logging.ERROR), f"{name} drops ERROR records"
    catcher = ErrorCatcher()
    logger.addHandler(catcher)
    try:
        yield catcher.records
    finally:
        logger.removeHandler(catcher)


def assert_clean(ua: UserAgent, errors: list[logging.LogRecord]) -> list:
    events = ua.take_events()
    assert not [e for e in events if isinstance(e, MalformedMessage) and e.reason == "Internal error"]
    assert not errors, errors[0].getMessage()
    ua.take_transmits()
    return events


def test_the_error_catcher_sees_only_its_own_block() -> None:
    log = logging.getLogger("gateway.sip.useragent")
    log.error("before the block: not ours")
    with sip_errors() as errors:
        log.warning("not an error")
        log.error("inside the block")
    log.error("after the block: not ours")
    assert [r.getMessage() for r in errors] == ["inside the block"]
    assert not [h for h in logging.getLogger("gateway.sip").handlers if isinstance(h, ErrorCatcher)]


def established() -> tuple[UserAgent, str]:
    ua = UserAgent(local_host="198.51.100.7", local_port=5060)
    ua.receive(message("INVITE", "z9hG4bKi1", 1, body=OFFER), PEER, 0.0)
    (call,) = [e for e in ua.take_events() if isinstance(e, IncomingCall)]
    ua.answer(call.dialog_id, OFFER, 0.0)
    ua.receive(message("ACK", "z9hG4bKa1", 1, to_tag=call.dialog_id), PEER, 0.1)
    ua.take_events()
    ua.take_transmits()
    return ua, call.dialog_id


@st.composite
def mutations(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "dupline", "swapline", "token"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 20))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        elif kind == "truncate":
            del data[pos:]
        elif kind in ("dupline", "swapline"):
            lines = bytes(data).split(b"\r\n")
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            if kind == "dupline":
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            data = bytearray(b"\r\n".join(lines))
        else:
            token = draw(
                st.sampled_from(
                    [b";", b",", b"<", b">", b'"', b"\\", b":", b"\r\n ", b"\r\n", b"\x00", b"\xff", b"%", b"999999999999", b"-1", b" ", b"z9hG4bK"]
                )
            )
            data[pos:pos] = token
    return bytes(data)


FUZZ_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(st.binary(max_size=1500))
def test_random_bytes_never_break_the_user_agent(data: bytes) -> None:
    with sip_errors() as errors:
        ua = UserAgent(local_host="198.51.100.7", local_port=5060)
        ua.receive(data, PEER, 0.0)
        ua.receive(b"INVITE sip:x@y SIP/2.0\r\n" + data, PEER, 0.1)
        ua.receive(b"SIP/2.0 200 OK\r\n" + data, PEER, 0.2)
        ua.handle_timers(100.0)
        assert_clean(ua, errors)


@FUZZ_SETTINGS
@given(st.data())
def test_mutated_messages_inside_a_live_call(data: st.DataObject) -> None:
    with sip_errors() as errors:
        ua, tag = established()
        seeds = [
            message("INVITE", "z9hG4bKn1", 1, body=OFFER, call_id="fz-2"),
            message("INVITE", "z9hG4bKr2", 2, to_tag=tag, body=OFFER),
            message("INVITE", "z9hG4bKr3", 3, to_tag=tag),
            message("ACK", "z9hG4bKa2", 2, to_tag=tag, body=OFFER),
            message("BYE", "z9hG4bKb1", 4, to_tag=tag),
            message("CANCEL", "z9hG4bKi1", 1),
            message("OPTIONS", "z9hG4bKo1", 5, to_tag=tag),
            message("UPDATE", "z9hG4bKu1", 6, to_tag=tag, body=OFFER),
            message("INFO", "z9hG4bKf1", 7, to_tag=tag),
            response(200, "z9hG4bKnotours"),
        ]
        now = 1.0
        for _ in range(data.draw(st.integers(1, 5))):
            seed = data.draw(st.sampled_from(seeds))
            mutated = data.draw(mutations(seed)) if data.draw(st.booleans()) else seed
            ua.receive(mutated, PEER, now)
            for event in assert_clean(ua, errors):
                # Play a cooperative application so every code path runs.
                if isinstance(event, IncomingCall):
                    ua.answer(event.dialog_id, OFFER, now)
                elif isinstance(event, ReInvite):
                    ua.accept_reinvite(event.dialog_id, OFFER, now)
            if data.draw(st.booleans()):
                ua.hangup(tag, now)
            now += data.draw(st.floats(0.0, 40.0))
            ua.handle_timers(now)
            assert_clean(ua, errors)


@FUZZ_SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_stream_framer_only_raises_framing_error(chunks: list[bytes]) -> None:
    framer = StreamFramer(max_message_bytes=2048)
    stream = b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 3\r\n\r\nabc"
    try:
        for chunk in [stream, *chunks, stream]:
            for msg in framer.feed(chunk):
                assert msg and len(msg) <= 2048
    except FramingError as exc:
        assert exc.reason
