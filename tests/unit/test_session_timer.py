"""RFC 4028 session timers: the negotiation (pure), the user agent's 422 and 2xx headers
(fake time), and a real Gateway that ends a call whose refresh never comes (real UDP)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.call import Call
from gateway.rtp.receiver import RtpReceiver
from gateway.sip.events import IncomingCall, Peer, ReInvite, SessionRefreshed
from gateway.sip.message import Headers, SipResponse, parse_message
from gateway.sip.session_timer import SessionTimer, TooSmall, bye_at, negotiate, response_headers
from gateway.sip.useragent import UserAgent
from tests.unit.test_gateway_failures import (  # noqa: F401  (fixtures)
    G711,
    Caller,
    branch,
    make_gateway,
    open_peer,
    published_events,
    wait_until,
)

PBX = Peer("udp", "203.0.113.5", 5062)
OFFER = b"v=0\r\no=pbx 1 1 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"


def headers(*pairs: tuple[str, str]) -> Headers:
    h = Headers()
    for name, value in pairs:
        h.add(name, value)
    return h


# -- negotiation ------------------------------------------------------------------------

def test_a_caller_without_timer_support_gets_no_timer():
    assert negotiate(headers(("Session-Expires", "1800")), interval=1800, min_se=90) is None


def test_the_callers_interval_is_granted_within_our_bounds():
    supported = ("Supported", "100rel, timer")
    assert negotiate(headers(supported, ("Session-Expires", "600;refresher=uas")), interval=1800, min_se=90) \
        == SessionTimer(600)
    assert negotiate(headers(supported, ("x", "7200")), interval=1800, min_se=90) == SessionTimer(1800)  # shortened
    assert negotiate(headers(supported), interval=1800, min_se=90) == SessionTimer(1800)  # we insert ours
    # never below the request's own Min-SE
    assert negotiate(headers(supported, ("Session-Expires", "7200"), ("Min-SE", "3600")), interval=1800,
                     min_se=90) == SessionTimer(3600)
    assert negotiate(headers(("Require", "timer"), ("Session-Expires", "300")), interval=1800, min_se=90) \
        == SessionTimer(300)


def test_too_small_an_interval_is_refused_with_our_min_se():
    assert negotiate(headers(("Supported", "timer"), ("Session-Expires", "30")), interval=1800, min_se=90) \
        == TooSmall(90)


def test_response_headers_make_the_caller_the_refresher_and_bye_comes_before_expiry():
    assert response_headers(SessionTimer(600)) == [("Session-Expires", "600;refresher=uac"), ("Require", "timer")]
    assert bye_at(100.0, SessionTimer(600)) == 100.0 + 600 - 32
    assert bye_at(0.0, SessionTimer(90)) == 90 - 30


# -- the user agent (fake time) --------------------------------------------------------

def request(method: str, *, cseq: int, extra: tuple[str, ...] = (), to_tag: str | None = None,
            body: bytes = b"") -> bytes:
    to = "<sip:earshot@192.0.2.1>" + (f";tag={to_tag}" if to_tag else "")
    lines = [f"{method} sip:earshot@192.0.2.1 SIP/2.0",
             f"Via: SIP/2.0/UDP 203.0.113.5:5062;branch=z9hG4bK{method}{cseq};rport",
             "Max-Forwards: 70", 'From: "PBX" <sip:pbx@203.0.113.5>;tag=pbx1', f"To: {to}",
             "Call-ID: timer-1@203.0.113.5", f"CSeq: {cseq} {method}", "Contact: <sip:pbx@203.0.113.5:5062>",
             *extra]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def responses(ua: UserAgent) -> list[SipResponse]:
    out = [parse_message(t.data) for t in ua.take_transmits()]
    return [m for m in out if isinstance(m, SipResponse)]


def test_user_agent_answers_422_then_grants_the_timer_on_every_refresh():
    ua = UserAgent(local_host="192.0.2.1", local_port=5060, session_expires=1800, min_se=90)
    ua.receive(request("INVITE", cseq=1, extra=("Supported: timer", "Session-Expires: 30"), body=OFFER), PBX, 0.0)
    (too_small,) = responses(ua)
    assert (too_small.status, too_small.reason) == (422, "Session Interval Too Small")
    assert too_small.headers.get("min-se") == "90"
    assert ua.take_events() == []  # no call for the application

    ua.receive(request("INVITE", cseq=2, extra=("Supported: timer", "Session-Expires: 600", "Min-SE: 90"),
                       body=OFFER), PBX, 1.0)
    (incoming,) = ua.take_events()
    assert isinstance(incoming, IncomingCall)
    responses(ua)  # 100 Trying
    assert ua.answer(incoming.dialog_id, OFFER, 1.0)
    (ok,) = responses(ua)
    assert ok.status == 200
    assert ok.headers.get("session-expires") == "600;refresher=uac"
    assert ok.headers.get_all("require") == ["timer"] and "timer" in ok.headers.get_all("supported")
    assert ua.take_events() == [SessionRefreshed(incoming.dialog_id, 600)]
    ua.receive(request("ACK", cseq=2, to_tag=incoming.dialog_id), PBX, 1.1)
    ua.take_events()

    # a refresh by UPDATE without a body: answered by the user agent itself, reported
    ua.receive(request("UPDATE", cseq=3, to_tag=incoming.dialog_id, extra=("Supported: timer",
                                                                            "Session-Expires: 600")), PBX, 300.0)
    (ok,) = responses(ua)
    assert ok.status == 200 and ok.headers.get("session-expires") == "600;refresher=uac"
    assert ua.take_events() == [SessionRefreshed(incoming.dialog_id, 600)]
    # a refresh asking too little: 422, the call (and its timer) stay as they were
    ua.receive(request("UPDATE", cseq=4, to_tag=incoming.dialog_id, extra=("Supported: timer",
                                                                            "Session-Expires: 10")), PBX, 301.0)
    assert [r.status for r in responses(ua)] == [422]
    assert ua.take_events() == []
    # a re-INVITE refresh goes through the application, which accepts it: the timer goes on
    ua.receive(request("INVITE", cseq=5, to_tag=incoming.dialog_id, extra=("Supported: timer",), body=OFFER),
               PBX, 302.0)
    (reinvite,) = ua.take_events()
    assert isinstance(reinvite, ReInvite)
    assert ua.accept_reinvite(incoming.dialog_id, OFFER, 302.0)
    assert [r.headers.get("session-expires") for r in responses(ua) if r.status == 200] == ["1800;refresher=uac"]
    assert ua.take_events() == [SessionRefreshed(incoming.dialog_id, 1800)]


def test_without_session_expires_configured_require_timer_gets_420():
    ua = UserAgent(local_host="192.0.2.1", local_port=5060)
    ua.receive(request("INVITE", cseq=1, extra=("Require: timer", "Session-Expires: 600"), body=OFFER), PBX, 0.0)
    (refused,) = responses(ua)
    assert refused.status == 420 and refused.headers.get("unsupported") == "timer"


# -- the call's deadline (fake time) -----------------------------------------------------

def make_call(answered_at: float = 0.0) -> Call:
    receiver = RtpReceiver(expected_host="203.0.113.5", expected_port=40000, codecs={0: "PCMU"},
                           dtmf_payload_type=None)
    return Call(call_id="c", dialog_id="d", leg="caller", receiver=receiver, answered_at=answered_at,
                local_port=10000, codec="PCMU", session_id=1, language=None)


def test_call_expires_when_no_refresh_came_and_not_before():
    call = make_call()
    limits = dict(media_timeout=1e9, hold_timeout=1e9, max_duration=1e9)
    call.session_expires_at = bye_at(0.0, SessionTimer(90))
    assert call.expired(59.9, **limits) is None
    call.session_expires_at = bye_at(50.0, SessionTimer(90))  # refreshed at 50 s
    assert call.expired(100.0, **limits) is None
    assert call.expired(110.0, **limits) == "session-expired"


# -- a real Gateway over UDP -------------------------------------------------------------------

class TimerCaller(Caller):
    """A caller that says ``Supported: timer`` and asks for ``Session-Expires``."""

    def __init__(self, *args, session_expires: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra = f"Supported: timer\r\nSession-Expires: {session_expires};refresher=uac\r\n"

    def request(self, method: str, **kwargs) -> bytes:  # type: ignore[override]
        data = super().request(method, **kwargs)
        if method in ("INVITE", "UPDATE"):
            data = data.replace(b"\r\nMax-Forwards: 70\r\n", f"\r\nMax-Forwards: 70\r\n{self.extra}".encode(), 1)
        return data

    async def update(self) -> SipResponse:
        """A session refresh: UPDATE without a body (RFC 4028 section 7.4)."""
        self.cseq += 1
        self.peer.send(self.request("UPDATE", cseq=self.cseq, via_branch=branch()))
        response = await self.peer.expect(self._is_final(self.cseq, "UPDATE"), "final response to UPDATE")
        assert isinstance(response, SipResponse)
        return response


async def test_gateway_ends_a_call_whose_refresh_never_comes_and_keeps_a_refreshed_one(make_gateway, open_peer):
    # 3 s intervals (the settings keep real ones at 90 s or more): the BYE is due 1 s before expiry
    gateway = await make_gateway(session_expires_s=3, session_min_se_s=2)
    peer = await open_peer(gateway)
    too_short = TimerCaller(peer, session_expires=1)
    refused = await too_short.invite(G711)
    assert (refused.status, refused.headers.get("min-se")) == (422, "2")

    silent = TimerCaller(peer, session_expires=3)
    refreshing = TimerCaller(peer, session_expires=3)
    for caller in (silent, refreshing):
        answer = await caller.invite(G711)
        assert answer.status == 200 and answer.headers.get("session-expires") == "3;refresher=uac"
        assert answer.headers.get_all("require") == ["timer"]
    started = time.monotonic()
    for _ in range(4):  # refresh every second for four seconds
        await asyncio.sleep(1.0)
        assert (await refreshing.update()).status == 200
    bye = await silent.expect_request("BYE", timeout=1.0)
    silent.respond(bye, 200, "OK")
    assert refreshing.to_tag in gateway.calls  # refreshed: still up after more than one interval
    assert time.monotonic() - started >= 4.0
    bye = await refreshing.expect_request("BYE", timeout=5.0)  # refreshes stopped
    refreshing.respond(bye, 200, "OK")
    await wait_until(lambda: not gateway.calls, "both calls to end")
    ended = [e for e in await published_events(gateway) if e["type"] == "call.ended"]
    assert [e["reason"] for e in ended] == ["session-expired", "session-expired"]
