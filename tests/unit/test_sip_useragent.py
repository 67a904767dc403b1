"""Call flows through the sans-I/O UserAgent with fake time."""

from __future__ import annotations

import pytest

from gateway import sdp
from gateway.sip.events import (
    CallCancelled,
    CallConfirmed,
    CallEnded,
    IncomingCall,
    Peer,
    ReInvite,
    ReInviteAck,
)
from gateway.sip.message import NameAddress, SipRequest, SipResponse, Via, parse_cseq, parse_message
from gateway.sip.useragent import UserAgent

LOCAL = "198.51.100.7"
PBX = Peer("udp", "203.0.113.5", 5062)
OFFER = (
    b"v=0\r\no=pbx 1 1 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n"
    b"m=audio 30000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n"
)
ANSWER = b"v=0\r\no=earshot 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"


def request(
    method: str,
    *,
    call_id: str = "call-1@203.0.113.5",
    branch: str = "z9hG4bKinv1",
    cseq: int = 1,
    cseq_method: str | None = None,
    from_tag: str = "pbx1",
    to_tag: str | None = None,
    body: bytes = b"",
    content_type: str | None = "application/sdp",
    contact: str | None = "<sip:pbx@203.0.113.5:5062>",
    extra: str = "",
    uri: str = f"sip:earshot@{LOCAL}",
    via_transport: str = "UDP",
) -> bytes:
    to = f"<sip:earshot@{LOCAL}>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/{via_transport} 203.0.113.5:5062;branch={branch};rport",
        "Max-Forwards: 70",
        f"From: \"PBX\" <sip:+15551234@203.0.113.5>;tag={from_tag}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {cseq_method or method}",
    ]
    if contact:
        lines.append(f"Contact: {contact}")
    if body and content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [line for line in extra.split("\n") if line]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Phone:
    """Drives a UserAgent as a PBX would, collecting what comes back."""

    def __init__(self, peer: Peer = PBX, local_host: str = LOCAL) -> None:
        self.ua = UserAgent(local_host=local_host, local_port=5060)
        self.peer = peer
        self.now = 0.0

    def send(self, data: bytes, at: float | None = None) -> list[SipResponse | SipRequest]:
        if at is not None:
            self.now = at
        self.ua.receive(data, self.peer, self.now)
        return self.out()

    def out(self) -> list[SipResponse | SipRequest]:
        return [parse_message(t.data) for t in self.ua.take_transmits()]

    def transmits(self) -> list:
        return self.ua.take_transmits()

    def events(self) -> list:
        return self.ua.take_events()

    def advance(self, to: float) -> list[tuple[float, SipResponse | SipRequest]]:
        """Run timers up to ``to`` the way the transport would, logging sends."""
        sent = []
        while (at := self.ua.next_timer()) is not None and at <= to:
            self.now = at
            self.ua.handle_timers(at)
            sent += [(at, m) for m in self.out()]
        self.now = to
        return sent

    def call(self, **kw: object) -> tuple[str, SipResponse]:
        """INVITE -> answer -> ACK; returns the dialog id and our 200."""
        responses = self.send(request("INVITE", body=OFFER, **kw))  # type: ignore[arg-type]
        assert [r.status for r in responses] == [100]  # type: ignore[union-attr]
        (event,) = self.events()
        assert isinstance(event, IncomingCall)
        assert self.ua.answer(event.dialog_id, ANSWER, self.now)
        (ok,) = self.out()
        assert isinstance(ok, SipResponse) and ok.status == 200
        tag = NameAddress.parse(ok.headers.get("to") or "").tag
        assert tag == event.dialog_id
        call_id = kw.get("call_id", "call-1@203.0.113.5")
        assert self.send(request("ACK", branch="z9hG4bKack1", to_tag=tag, call_id=call_id)) == []  # type: ignore[arg-type]
        assert self.events() == [CallConfirmed(event.dialog_id)]
        return event.dialog_id, ok


def status_of(messages: list) -> list[int]:
    return [m.status for m in messages]


# -- basic call ---------------------------------------------------------------


def test_invite_100_200_ack_bye() -> None:
    phone = Phone()
    responses = phone.send(request("INVITE", body=OFFER, extra="Record-Route: <sip:sbc.example.com;lr>"))
    (trying,) = responses
    assert isinstance(trying, SipResponse) and trying.status == 100
    assert NameAddress.parse(trying.headers.get("to") or "").tag is None  # 100 creates no dialog
    via = Via.parse(trying.headers.get("via") or "")
    assert (via.received, via.params["rport"]) == ("203.0.113.5", "5062")
    (event,) = phone.events()
    assert isinstance(event, IncomingCall)
    assert event.offer == OFFER and event.peer == PBX and event.request.method == "INVITE"

    phone.ua.answer(event.dialog_id, ANSWER, 0.2)
    (ok,) = phone.out()
    assert isinstance(ok, SipResponse) and ok.status == 200 and ok.body == ANSWER
    assert ok.headers.get("content-type") == "application/sdp"
    assert ok.headers.get("contact") == f"<sip:earshot@{LOCAL}:5060>"
    assert ok.headers.get("record-route") == "<sip:sbc.example.com;lr>"
    assert NameAddress.parse(ok.headers.get("to") or "").tag == event.dialog_id
    assert "BYE" in ok.headers.get_all("allow")

    phone.send(request("ACK", branch="z9hG4bKack1", to_tag=event.dialog_id), at=0.3)
    assert phone.events() == [CallConfirmed(event.dialog_id)]
    assert phone.advance(60.0) == []  # no 2xx retransmissions after the ACK

    (bye_ok,) = phone.send(request("BYE", branch="z9hG4bKbye1", cseq=2, to_tag=event.dialog_id), at=61.0)
    assert isinstance(bye_ok, SipResponse) and bye_ok.status == 200
    assert parse_cseq(bye_ok.headers.get("cseq") or "") == (2, "BYE")
    assert phone.events() == [CallEnded(event.dialog_id, "bye")]
    assert phone.ua.dialog_count == 0
    # A retransmitted BYE is answered by its transaction, no second event.
    assert status_of(phone.send(request("BYE", branch="z9hG4bKbye1", cseq=2, to_tag=event.dialog_id))) == [200]
    assert phone.events() == []
    # A new BYE for the finished dialog: 481.
    assert status_of(phone.send(request("BYE", branch="z9hG4bKbye2", cseq=3, to_tag=event.dialog_id))) == [481]


def test_200_retransmitted_with_t1_doubling_until_ack_timeout_then_bye() -> None:
    phone = Phone()
    phone.send(request("INVITE", body=OFFER))
    (event,) = phone.events()
    phone.ua.answer(event.dialog_id, ANSWER, 0.0)
    phone.out()
    sent = phone.advance(40.0)
    oks = [at for at, m in sent if isinstance(m, SipResponse) and m.status == 200]
    # T1 = 0.5 doubling to T2 = 4: 0.5, 1.5, 3.5, 7.5, then every 4 s until 64*T1 = 32 s.
    assert oks == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    byes = [(at, m) for at, m in sent if isinstance(m, SipRequest)]
    assert byes[0][0] == 32.0
    bye = byes[0][1]
    assert bye.method == "BYE" and bye.uri == "sip:pbx@203.0.113.5:5062"
    assert parse_cseq(bye.headers.get("cseq") or "") == (1, "BYE")
    assert NameAddress.parse(bye.headers.get("from") or "").tag == event.dialog_id
    assert NameAddress.parse(bye.headers.get("to") or "").tag == "pbx1"
    assert bye.headers.get("reason") == 'SIP;cause=408;text="ACK Timeout"'
    assert phone.events() == [CallEnded(event.dialog_id, "ack-timeout")]
    # Our BYE is retransmitted over UDP (Timer E) until answered ...
    assert [at for at, _ in byes] == [32.0, 32.5, 33.5, 35.5, 39.5]
    # ... and answering it ends everything without a second CallEnded.
    bye_via = Via.parse(bye.headers.get("via") or "")
    assert bye_via.branch and bye_via.branch.startswith("z9hG4bK") and bye_via.host == LOCAL
    ok = (
        f"SIP/2.0 200 OK\r\nVia: {bye.headers.get('via')}\r\nFrom: {bye.headers.get('from')}\r\n"
        f"To: {bye.headers.get('to')}\r\nCall-ID: {bye.headers.get('call-id')}\r\nCSeq: 1 BYE\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    assert phone.send(ok, at=40.0) == []
    assert phone.events() == [] and phone.advance(100.0) == [] and phone.ua.dialog_count == 0


def test_retransmitted_invite_is_absorbed() -> None:
    phone = Phone()
    invite = request("INVITE", body=OFFER)
    assert status_of(phone.send(invite)) == [100]
    (event,) = phone.events()
    assert status_of(phone.send(invite, at=0.5)) == [100]
    assert phone.events() == []
    phone.ua.answer(event.dialog_id, ANSWER, 0.6)
    phone.out()
    # After the 2xx, a late INVITE retransmission gets the 2xx again.
    assert status_of(phone.send(invite, at=0.7)) == [200]
    assert phone.events() == []


# -- CANCEL -------------------------------------------------------------------


def test_cancel_before_answer() -> None:
    phone = Phone()
    phone.send(request("INVITE", body=OFFER))
    (event,) = phone.events()
    cancel = request("CANCEL", contact=None)  # same branch as the INVITE
    responses = phone.send(cancel, at=1.0)
    assert [(r.status, parse_cseq(r.headers.get("cseq") or "")[1]) for r in responses] == [(200, "CANCEL"), (487, "INVITE")]
    tags = {NameAddress.parse(r.headers.get("to") or "").tag for r in responses}
    assert tags == {event.dialog_id}  # RFC 3261 9.2: same To tag on both
    assert phone.events() == [CallCancelled(event.dialog_id), CallEnded(event.dialog_id, "cancelled")]
    assert phone.ua.answer(event.dialog_id, ANSWER, 1.1) is False  # too late: nothing sent
    assert phone.out() == []
    # The 487 is retransmitted (Timer G) until the ACK, which the transaction absorbs.
    sent = phone.advance(2.0)
    assert [(at, m.status) for at, m in sent] == [(1.5, 487)]
    ack = request("ACK", to_tag=event.dialog_id, contact=None)  # ACK to non-2xx: INVITE's branch
    assert phone.send(ack, at=2.0) == []
    assert phone.advance(60.0) == [] and phone.events() == []


def test_cancel_unknown_and_after_answer() -> None:
    phone = Phone()
    assert status_of(phone.send(request("CANCEL", branch="z9hG4bKnothing"))) == [481]
    dialog_id, _ = phone.call()
    # CANCEL after the 2xx: 200 for the CANCEL, but the call stands.
    assert status_of(phone.send(request("CANCEL", contact=None))) == [200]
    assert phone.events() == [] and phone.ua.dialog_count == 1


# -- OPTIONS, 481, 405, 501, 483, 420, 415, 406 -----------------------------


def test_options_outside_and_inside_dialog() -> None:
    phone = Phone()
    (ok,) = phone.send(request("OPTIONS", branch="z9hG4bKopt", call_id="ping-1", contact=None))
    assert ok.status == 200
    assert ok.headers.get_all("allow") == ["INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "UPDATE", "INFO"]
    assert ok.headers.get("accept") == "application/sdp"
    # we support no option tags; an empty Supported header would trip some peers (pyVoIP)
    assert "supported" not in ok.headers
    assert NameAddress.parse(ok.headers.get("to") or "").tag  # out of dialog: we add a tag
    dialog_id, _ = phone.call()
    (ok,) = phone.send(request("OPTIONS", branch="z9hG4bKopt2", cseq=2, to_tag=dialog_id))
    assert ok.status == 200 and NameAddress.parse(ok.headers.get("to") or "").tag == dialog_id


def test_options_while_draining_503_but_calls_keep_theirs() -> None:
    """A draining gateway fails a load balancer's OPTIONS probe (deploy/kamailio), not its calls' own."""
    phone = Phone()
    dialog_id, _ = phone.call()
    phone.ua.draining, phone.ua.draining_retry_after = True, 7
    (probe,) = phone.send(request("OPTIONS", branch="z9hG4bKdrain", call_id="ping-2", contact=None))
    assert probe.status == 503 and probe.headers.get("retry-after") == "7"
    (ok,) = phone.send(request("OPTIONS", branch="z9hG4bKdrain2", cseq=2, to_tag=dialog_id))
    assert ok.status == 200
    phone.ua.draining = False
    (probe,) = phone.send(request("OPTIONS", branch="z9hG4bKdrain3", call_id="ping-3", contact=None))
    assert probe.status == 200


def test_unknown_dialog_gets_481() -> None:
    phone = Phone()
    for method in ("BYE", "INVITE", "OPTIONS", "UPDATE", "INFO"):
        responses = phone.send(request(method, branch=f"z9hG4bK{method}", to_tag="nosuchtag", cseq=5))
        assert status_of(responses) == [481], method
    # BYE/INFO/UPDATE without To tag cannot belong to any dialog either.
    assert status_of(phone.send(request("BYE", branch="z9hG4bKb2"))) == [481]
    # ACK never gets a response, even for an unknown dialog.
    assert phone.send(request("ACK", branch="z9hG4bKa", to_tag="nosuchtag")) == []
    assert phone.events() == []


def test_known_unsupported_methods_405_unknown_501() -> None:
    phone = Phone()
    for method in ("REGISTER", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER"):
        (resp,) = phone.send(request(method, branch=f"z9hG4bK{method}"))
        assert resp.status == 405, method
        assert "INVITE" in resp.headers.get_all("allow")
    (resp,) = phone.send(request("FROBNICATE", branch="z9hG4bKfrob"))
    assert resp.status == 501
    assert phone.events() == []


def test_max_forwards_zero_gets_483() -> None:
    phone = Phone()
    data = request("INVITE", body=OFFER).replace(b"Max-Forwards: 70", b"Max-Forwards: 0")
    assert status_of(phone.send(data)) == [483]
    assert phone.events() == []
    # Missing Max-Forwards is treated as 70.
    data = request("OPTIONS", branch="z9hG4bKmf").replace(b"Max-Forwards: 70\r\n", b"")
    assert status_of(phone.send(data)) == [200]


def test_require_unknown_extension_420() -> None:
    phone = Phone()
    (resp,) = phone.send(request("INVITE", body=OFFER, extra="Require: 100rel, timer"))
    assert resp.status == 420 and resp.headers.get_all("unsupported") == ["100rel", "timer"]
    assert phone.events() == []


def test_non_sdp_body_415_and_unacceptable_accept_406() -> None:
    phone = Phone()
    (resp,) = phone.send(request("INVITE", body=b"hello", content_type="text/plain"))
    assert resp.status == 415 and resp.headers.get("accept") == "application/sdp"
    (resp,) = phone.send(request("INVITE", branch="z9hG4bK2", call_id="c2", body=OFFER, extra="Content-Encoding: gzip"))
    assert resp.status == 415
    (resp,) = phone.send(request("INVITE", branch="z9hG4bK3", call_id="c3", body=OFFER, extra="Accept: text/html"))
    assert resp.status == 406
    assert phone.events() == []
    # Accept including SDP, or */*, is fine.
    phone.send(request("INVITE", branch="z9hG4bK4", call_id="c4", body=OFFER, extra="Accept: text/html, */*"))
    assert isinstance(phone.events()[0], IncomingCall)


def test_second_invite_same_call_id_while_pending() -> None:
    phone = Phone()
    phone.send(request("INVITE", body=OFFER))
    (event,) = phone.events()
    # Same request via another branch (forked back to us): merged request, 482.
    assert status_of(phone.send(request("INVITE", branch="z9hG4bKother", body=OFFER))) == [482]
    # New CSeq while the first is in progress: 500 with Retry-After 0..10.
    (resp,) = phone.send(request("INVITE", branch="z9hG4bKthird", cseq=2, body=OFFER))
    assert resp.status == 500 and 0 <= int(resp.headers.get("retry-after") or "-1") <= 10
    assert phone.events() == []
    assert phone.ua.answer(event.dialog_id, ANSWER, 1.0)


# -- reject paths --------------------------------------------------------------


def test_reject_488_retransmitted_until_ack() -> None:
    phone = Phone()
    phone.send(request("INVITE", body=OFFER))
    (event,) = phone.events()
    assert phone.ua.reject(event.dialog_id, 488, now=0.0)
    (resp,) = phone.out()
    assert resp.status == 488 and resp.reason == "Not Acceptable Here"
    tag = NameAddress.parse(resp.headers.get("to") or "").tag
    assert tag == event.dialog_id
    sent = phone.advance(4.0)
    assert [at for at, _ in sent] == [0.5, 1.5, 3.5]  # Timer G
    phone.send(request("ACK", to_tag=tag, contact=None), at=4.0)
    assert phone.advance(100.0) == []
    assert phone.events() == []  # the application made the decision: no CallEnded


def test_reject_without_ack_stops_at_timer_h() -> None:
    phone = Phone()
    phone.send(request("INVITE", body=OFFER))
    (event,) = phone.events()
    phone.ua.reject(event.dialog_id, 486, now=0.0)
    phone.out()
    sent = phone.advance(200.0)
    assert [at for at, _ in sent] == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert phone.ua.next_timer() is None


def test_reject_503_with_retry_after() -> None:
    phone = Phone()
    phone.send(request("INVITE", body=OFFER))
    (event,) = phone.events()
    phone.ua.reject(event.dialog_id, 503, "Service Unavailable - Call Limit Reached", [("Retry-After", "30")], now=0.0)
    (resp,) = phone.out()
    assert (resp.status, resp.reason, resp.headers.get("retry-after")) == (
        503, "Service Unavailable - Call Limit Reached", "30",
    )
    with pytest.raises(ValueError):
        phone.ua.reject(event.dialog_id, 200)
    assert phone.ua.reject(event.dialog_id, 486) is False  # already rejected


# -- re-INVITE ------------------------------------------------------------------


def _reinvite(phone: Phone, dialog_id: str, offer_sdp: bytes, cseq: int, at: float) -> ReInvite:
    responses = phone.send(
        request("INVITE", branch=f"z9hG4bKre{cseq}", cseq=cseq, to_tag=dialog_id, body=offer_sdp), at=at
    )
    assert status_of(responses) == [100]
    (event,) = phone.events()
    assert isinstance(event, ReInvite) and event.dialog_id == dialog_id
    return event


def test_reinvite_hold_resume_and_codec_change() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    cases = [
        (OFFER.replace(b"t=0 0\r\n", b"t=0 0\r\na=sendonly\r\n"), True, "recvonly", 0),  # hold
        (OFFER.replace(b"c=IN IP4 203.0.113.5", b"c=IN IP4 0.0.0.0"), True, "recvonly", 0),  # old-style hold
        (OFFER, False, "recvonly", 0),  # resume
        (OFFER.replace(b"RTP/AVP 0 8 101", b"RTP/AVP 8 101"), False, "recvonly", 8),  # codec change
        (OFFER.replace(b"t=0 0\r\n", b"t=0 0\r\na=inactive\r\n"), True, "inactive", 0),
    ]
    for index, (offer_sdp, hold, direction, pt) in enumerate(cases):
        cseq = 2 + index
        event = _reinvite(phone, dialog_id, offer_sdp, cseq, at=10.0 * (index + 1))
        negotiated = sdp.negotiate(
            sdp.SessionDescription.parse(event.offer), local_host=LOCAL, local_port=40000,
            session_id=1, session_version=2 + index,
        )
        assert (negotiated.on_hold, negotiated.payload_type) == (hold, pt)
        assert phone.ua.accept_reinvite(dialog_id, negotiated.answer.to_bytes(), phone.now)
        (ok,) = phone.out()
        assert ok.status == 200 and f"a={direction}".encode() in ok.body
        assert parse_cseq(ok.headers.get("cseq") or "") == (cseq, "INVITE")
        phone.send(request("ACK", branch=f"z9hG4bKreack{cseq}", cseq=cseq, to_tag=dialog_id), at=phone.now + 0.1)
        assert phone.events() == []
        assert phone.advance(phone.now + 9.0) == []  # ACKed: no more 200s
    assert phone.ua.dialog_count == 1


def test_offerless_reinvite_answer_in_ack() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    event = _reinvite(phone, dialog_id, b"", cseq=2, at=5.0)
    assert event.offer == b""
    ours = sdp.build_offer(local_host=LOCAL, local_port=40000, session_id=1, session_version=2)
    phone.ua.accept_reinvite(dialog_id, ours.to_bytes(), 5.0)
    (ok,) = phone.out()
    assert ok.status == 200 and b"a=recvonly" in ok.body
    # Without an ACK the 200 is retransmitted.
    assert [m.status for _, m in phone.advance(5.6)] == [200]
    answer = OFFER.replace(b"RTP/AVP 0 8 101", b"RTP/AVP 8 101")
    phone.send(request("ACK", branch="z9hG4bKa2", cseq=2, to_tag=dialog_id, body=answer), at=6.0)
    (ack_event,) = phone.events()
    assert ack_event == ReInviteAck(dialog_id, answer)
    negotiated = sdp.read_answer(ours, sdp.SessionDescription.parse(ack_event.answer))
    assert negotiated.codec == "PCMA"
    assert phone.advance(60.0) == []


def test_reinvite_while_one_pending_gets_500_and_reject_keeps_call() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    _reinvite(phone, dialog_id, OFFER, cseq=2, at=1.0)
    (resp,) = phone.send(request("INVITE", branch="z9hG4bKre3", cseq=3, to_tag=dialog_id, body=OFFER))
    assert resp.status == 500 and resp.headers.get("retry-after") is not None
    assert phone.ua.reject_reinvite(dialog_id, 488, 1.5)
    (resp,) = phone.out()
    assert resp.status == 488
    # Out-of-order CSeq is refused; the call goes on.
    (resp,) = phone.send(request("OPTIONS", branch="z9hG4bKold", cseq=2, to_tag=dialog_id))
    assert resp.status == 500
    assert phone.ua.dialog_count == 1


def test_bye_while_reinvite_pending_487s_it() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    _reinvite(phone, dialog_id, OFFER, cseq=2, at=1.0)
    responses = phone.send(request("BYE", branch="z9hG4bKbye", cseq=3, to_tag=dialog_id), at=2.0)
    assert sorted((parse_cseq(r.headers.get("cseq") or "")[1], r.status) for r in responses) == [("BYE", 200), ("INVITE", 487)]
    assert phone.events() == [CallEnded(dialog_id, "bye")]
    assert phone.ua.accept_reinvite(dialog_id, ANSWER, 2.1) is False


def test_update_info_prack() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    # Session refresh by UPDATE without a body: plain 200, no event.
    assert status_of(phone.send(request("UPDATE", branch="z9hG4bKu1", cseq=2, to_tag=dialog_id))) == [200]
    assert phone.events() == []
    # UPDATE with SDP is an offer like a re-INVITE (no ACK follows).
    phone.send(request("UPDATE", branch="z9hG4bKu2", cseq=3, to_tag=dialog_id, body=OFFER))
    (event,) = phone.events()
    assert isinstance(event, ReInvite) and event.request.method == "UPDATE"
    phone.ua.accept_reinvite(dialog_id, ANSWER, phone.now)
    assert status_of(phone.out()) == [200]
    assert phone.advance(10.0) == []
    assert status_of(phone.send(request("INFO", branch="z9hG4bKi", cseq=4, to_tag=dialog_id))) == [200]
    assert status_of(phone.send(request("PRACK", branch="z9hG4bKp", cseq=5, to_tag=dialog_id))) == [481]


# -- delayed offer ------------------------------------------------------------------


def test_delayed_offer_invite() -> None:
    phone = Phone()
    phone.send(request("INVITE"))
    (event,) = phone.events()
    assert isinstance(event, IncomingCall) and event.offer == b""
    ours = sdp.build_offer(local_host=LOCAL, local_port=40000, session_id=3, session_version=1)
    phone.ua.answer(event.dialog_id, ours.to_bytes(), 0.1)
    phone.out()
    phone.send(request("ACK", branch="z9hG4bKack", to_tag=event.dialog_id, body=OFFER), at=0.2)
    assert phone.events() == [CallConfirmed(event.dialog_id, OFFER)]


# -- hangup -------------------------------------------------------------------------


def test_hangup_sends_bye_and_reports_when_answered() -> None:
    phone = Phone()
    dialog_id, _ = phone.call(extra="Record-Route: <sip:sbc2.example.com:5070;lr>, <sip:sbc1.example.com;lr>")
    assert phone.ua.hangup(dialog_id, 5.0)
    (bye,) = phone.ua.take_transmits()
    msg = parse_message(bye.data)
    assert isinstance(msg, SipRequest) and msg.method == "BYE"
    # Loose routing: Request-URI is the remote target, Route carries the set,
    # but the BYE itself goes only where the dialog came from (never to a route's host).
    assert msg.uri == "sip:pbx@203.0.113.5:5062"
    assert msg.headers.get_all("route") == ["<sip:sbc2.example.com:5070;lr>", "<sip:sbc1.example.com;lr>"]
    assert bye.peer == PBX
    assert phone.events() == []  # not yet: the BYE is not answered
    assert phone.ua.hangup(dialog_id, 5.1) is False  # idempotent
    # A 408/481/200 all end it; Timer F otherwise.
    resp = (
        f"SIP/2.0 481 Call Does Not Exist\r\nVia: {msg.headers.get('via')}\r\nFrom: {msg.headers.get('from')}\r\n"
        f"To: {msg.headers.get('to')}\r\nCall-ID: {msg.headers.get('call-id')}\r\nCSeq: 1 BYE\r\n\r\n"
    ).encode()
    phone.send(resp, at=5.2)
    assert phone.events() == [CallEnded(dialog_id, "local-bye")]


def test_hangup_bye_timeout_ends_after_64_t1() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    phone.ua.hangup(dialog_id, 10.0)
    phone.out()
    sent = phone.advance(100.0)
    assert [at for at, _ in sent] == [10.5, 11.5, 13.5, 17.5, 21.5, 25.5, 29.5, 33.5, 37.5, 41.5]
    assert phone.events() == [CallEnded(dialog_id, "local-bye")]
    assert phone.ua.dialog_count == 0 and phone.ua.next_timer() is None


def test_strict_route_rewrites_request_uri() -> None:
    phone = Phone()
    dialog_id, _ = phone.call(extra="Record-Route: <sip:old-proxy.example.com;transport=udp>")
    phone.ua.hangup(dialog_id, 1.0)
    (bye,) = phone.ua.take_transmits()
    msg = parse_message(bye.data)
    assert msg.uri == "sip:old-proxy.example.com;transport=udp"  # type: ignore[union-attr]
    assert msg.headers.get_all("route") == ["<sip:pbx@203.0.113.5:5062>"]
    assert bye.peer == PBX  # the dialog's source, not the strict route's host


def test_hangup_before_answer_and_before_ack() -> None:
    phone = Phone()
    phone.send(request("INVITE", body=OFFER))
    (event,) = phone.events()
    phone.ua.hangup(event.dialog_id, 0.5)
    assert status_of(phone.out()) == [480]
    assert phone.events() == [CallEnded(event.dialog_id, "local-bye")]

    phone.send(request("INVITE", call_id="c2", branch="z9hG4bKc2", body=OFFER), at=1.0)
    (event,) = phone.events()
    phone.ua.answer(event.dialog_id, ANSWER, 1.0)
    phone.out()
    phone.ua.hangup(event.dialog_id, 1.1)
    assert phone.out() == []  # RFC 3261 15: no BYE before the ACK
    out = phone.send(request("ACK", call_id="c2", branch="z9hG4bKa", to_tag=event.dialog_id), at=1.2)
    assert [m.method for m in out] == ["BYE"]  # type: ignore[union-attr]
    assert phone.events() == [CallConfirmed(event.dialog_id)]


def test_remote_bye_during_our_bye_single_call_ended() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    phone.ua.hangup(dialog_id, 1.0)
    phone.out()
    assert status_of(phone.send(request("BYE", branch="z9hG4bKb", cseq=2, to_tag=dialog_id), at=1.1)) == [200]
    assert phone.events() == [CallEnded(dialog_id, "bye")]
    phone.advance(100.0)
    assert phone.events() == [] and phone.ua.dialog_count == 0


# -- transports and addressing ----------------------------------------------------


def test_tcp_contact_bye_on_same_connection_and_no_udp_retransmits() -> None:
    tcp = Peer("tcp", "203.0.113.5", 40123, connection=7)
    phone = Phone(peer=tcp)
    phone.send(request("INVITE", body=OFFER, via_transport="TCP", contact="<sip:pbx@203.0.113.5:5060;transport=tcp>"))
    (event,) = phone.events()
    phone.ua.reject(event.dialog_id, 486, now=0.0)
    assert status_of(phone.out()) == [486]
    assert phone.advance(1.0) == []  # no Timer G on TCP

    phone.send(request("INVITE", call_id="c2", branch="z9hG4bKt2", body=OFFER, via_transport="TCP",
                       contact="<sip:pbx@203.0.113.5:5060;transport=tcp>"), at=2.0)
    (event,) = phone.events()
    phone.ua.answer(event.dialog_id, ANSWER, 2.0)
    (ok,) = phone.out()
    assert ok.headers.get("contact") == f"<sip:earshot@{LOCAL}:5060;transport=tcp>"
    phone.send(request("ACK", call_id="c2", branch="z9hG4bKa", to_tag=event.dialog_id, via_transport="TCP"), at=2.1)
    phone.events()
    phone.ua.hangup(event.dialog_id, 3.0)
    (bye,) = phone.ua.take_transmits()
    assert bye.peer == tcp  # on the INVITE's own connection
    assert b"SIP/2.0/TCP" in bye.data
    assert phone.advance(10.0) == []  # no Timer E on TCP


def test_tcp_connection_lost_before_answer() -> None:
    tcp = Peer("tcp", "203.0.113.5", 40123, connection=9)
    phone = Phone(peer=tcp)
    phone.send(request("INVITE", body=OFFER, via_transport="TCP", contact="<sip:pbx@203.0.113.5:5070;transport=tcp>"))
    (event,) = phone.events()
    phone.out()
    phone.ua.connection_lost(9)
    phone.ua.answer(event.dialog_id, ANSWER, 1.0)
    # RFC 3261 18.2.2: a new connection to the source IP at the Via sent-by port.
    (ok,) = phone.ua.take_transmits()
    assert ok.peer == Peer("tcp", "203.0.113.5", 5062, None)
    assert [t.peer for t in phone.ua.take_transmits()] == []
    phone.ua.handle_timers(1.5)
    assert [t.peer for t in phone.ua.take_transmits()] == [Peer("tcp", "203.0.113.5", 5062, None)]
    # The peer reconnects (id 10) to send the ACK: the dialog adopts that
    # connection, so our BYE (addressed to the Contact) travels on it.
    phone.peer = Peer("tcp", "203.0.113.5", 40999, connection=10)
    phone.send(request("ACK", branch="z9hG4bKack", to_tag=event.dialog_id, via_transport="TCP"), at=2.0)
    phone.ua.hangup(event.dialog_id, 3.0)
    (bye,) = phone.ua.take_transmits()
    assert (bye.peer.host, bye.peer.connection) == ("203.0.113.5", 10)


def test_local_host_for_wildcard_uses_request_uri() -> None:
    phone = Phone(local_host="0.0.0.0")
    phone.send(request("INVITE", body=OFFER, uri="sip:earshot@192.0.2.44:5060"))
    (event,) = phone.events()
    assert phone.ua.local_host_for(event.request) == "192.0.2.44"
    phone.ua.answer(event.dialog_id, ANSWER, 0.0)
    (ok,) = phone.out()
    assert ok.headers.get("contact") == "<sip:earshot@192.0.2.44:5060>"
    assert UserAgent(local_host="10.1.1.1", local_port=5060).local_host_for(event.request) == "10.1.1.1"


def test_stray_responses_are_dropped() -> None:
    phone = Phone()
    stray = (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKnotours\r\nFrom: <sip:a@b>;tag=1\r\n"
        b"To: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    assert phone.send(stray) == [] and phone.events() == []


def test_application_calls_on_unknown_dialogs_are_harmless() -> None:
    ua = UserAgent(local_host=LOCAL, local_port=5060)
    assert ua.answer("nope", ANSWER, 0.0) is False
    assert ua.reject("nope", 486, now=0.0) is False
    assert ua.hangup("nope", 0.0) is False
    assert ua.accept_reinvite("nope", ANSWER, 0.0) is False
    assert ua.reject_reinvite("nope", 488, 0.0) is False
    assert ua.take_transmits() == [] and ua.take_events() == []
    with pytest.raises(ValueError):
        ua.answer("nope", b"", 0.0)
