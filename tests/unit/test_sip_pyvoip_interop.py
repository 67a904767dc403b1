"""Every response our user agent writes must parse in an independent SIP implementation:
pyVoIP's own parser (see docs/architecture.md for why pyVoIP is used here and not on
the trunk side)."""

from __future__ import annotations

import pytest

pytest.importorskip("pyVoIP")
import pyVoIP.VoIP  # noqa: E402,F401  (pyVoIP.SIP imports cleanly only after pyVoIP.VoIP)
from pyVoIP.SIP import SIPMessage  # noqa: E402

from gateway import sdp  # noqa: E402
from gateway.sip.events import IncomingCall, Peer  # noqa: E402
from gateway.sip.useragent import UserAgent  # noqa: E402

PBX = Peer("udp", "203.0.113.5", 5062)
OFFER = (
    b"v=0\r\no=pbx 1 1 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n"
    b"m=audio 30000 RTP/AVP 8 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\n"
)


def request(method: str, *, branch: str, cseq: int, to_tag: str = "", body: bytes = b"") -> bytes:
    to = "<sip:1000@198.51.100.7>" + (f";tag={to_tag}" if to_tag else "")
    head = [
        f"{method} sip:1000@198.51.100.7 SIP/2.0",
        f"Via: SIP/2.0/UDP 203.0.113.5:5062;branch={branch};rport",
        "Max-Forwards: 70",
        '"Caller" <sip:5551234@203.0.113.5>;tag=pbx1'.join(["From: ", ""]),
        f"To: {to}",
        "Call-ID: interop-1@203.0.113.5",
        f"CSeq: {cseq} {method}",
        "Contact: <sip:5551234@203.0.113.5:5062>",
    ]
    if body:
        head.append("Content-Type: application/sdp")
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def parsed(ua: UserAgent) -> list[SIPMessage]:
    return [SIPMessage(t.data) for t in ua.take_transmits()]


def test_call_flow_responses_parse_in_pyvoip():
    ua = UserAgent(local_host="198.51.100.7", local_port=5060)
    ua.receive(request("INVITE", branch="z9hG4bKa1", cseq=1, body=OFFER), PBX, 0.0)
    (trying,) = parsed(ua)
    assert trying.status.value == 100
    (incoming,) = [e for e in ua.take_events() if isinstance(e, IncomingCall)]
    negotiated = sdp.negotiate(sdp.parse_sdp(incoming.offer), local_host="198.51.100.7", local_port=40000,
                               session_id=1, session_version=1)
    ua.answer(incoming.dialog_id, negotiated.answer.to_bytes(), 0.1)
    (ok,) = parsed(ua)
    assert ok.status.value == 200
    assert ok.headers["Call-ID"] == "interop-1@203.0.113.5"
    assert ok.headers["CSeq"] == {"check": "1", "method": "INVITE"}
    assert ok.headers["From"]["tag"] == "pbx1"
    to_tag = ok.headers["To"]["tag"]
    assert to_tag
    assert ok.headers["Via"][0]["branch"] == "z9hG4bKa1"
    # pyVoIP parses the SDP answer too: PCMA chosen (first offered), telephone-event kept
    media = ok.body["m"][0]
    assert media["port"] == 40000
    assert [str(m) for m in media["methods"]][:1] == ["8"]
    assert ok.body["c"][0]["address"] == "198.51.100.7"
    ua.receive(request("ACK", branch="z9hG4bKa2", cseq=1, to_tag=to_tag), PBX, 0.2)
    ua.receive(request("OPTIONS", branch="z9hG4bKa3", cseq=2, to_tag=to_tag), PBX, 0.3)
    (options,) = parsed(ua)
    assert options.status.value == 200 and "INVITE" in options.headers["Allow"]
    ua.receive(request("BYE", branch="z9hG4bKa4", cseq=3, to_tag=to_tag), PBX, 0.4)
    (bye_ok,) = parsed(ua)
    assert bye_ok.status.value == 200 and bye_ok.headers["CSeq"]["method"] == "BYE"


@pytest.mark.parametrize("method, status", [("REGISTER", 405), ("FROBNICATE", 501)])
def test_rejections_parse_in_pyvoip(method, status):
    ua = UserAgent(local_host="198.51.100.7", local_port=5060)
    ua.receive(request(method, branch="z9hG4bKb1", cseq=1), PBX, 0.0)
    (response,) = parsed(ua)
    assert response.status.value == status


def test_overload_503_with_retry_after_parses_in_pyvoip():
    ua = UserAgent(local_host="198.51.100.7", local_port=5060)
    ua.receive(request("INVITE", branch="z9hG4bKc1", cseq=1, body=OFFER), PBX, 0.0)
    parsed(ua)
    (incoming,) = [e for e in ua.take_events() if isinstance(e, IncomingCall)]
    ua.reject(incoming.dialog_id, 503, "Service Unavailable - Call Limit Reached", [("Retry-After", "30")], now=0.1)
    (busy,) = parsed(ua)
    assert busy.status.value == 503
    assert busy.headers["Retry-After"] == "30"
