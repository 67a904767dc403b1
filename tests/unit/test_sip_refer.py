"""Call transfer: our REFER (RFC 3515) inside a dialog and the NOTIFYs that report on it, with fake time."""

from __future__ import annotations

from gateway.sip.events import ReferNotify, ReferResponse
from gateway.sip.message import SipRequest, SipResponse, parse_cseq, parse_message
from tests.unit.test_sip_useragent import PBX, Phone, request, status_of

TARGET = "sip:queue-billing@203.0.113.80:5070"


def answer(msg: SipRequest, status: int, phrase: str = "Accepted") -> bytes:
    h = msg.headers
    return (f"SIP/2.0 {status} {phrase}\r\nVia: {h.get('via')}\r\nFrom: {h.get('from')}\r\n"
            f"To: {h.get('to')}\r\nCall-ID: {h.get('call-id')}\r\nCSeq: {h.get('cseq')}\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def notify(dialog_id: str, cseq: int, frag: bytes, state: str = "active;expires=60",
           event: str = "refer", branch: str | None = None) -> bytes:
    return request("NOTIFY", branch=branch or f"z9hG4bKnot{cseq}", cseq=cseq, to_tag=dialog_id, body=frag,
                   content_type="message/sipfrag;version=2.0",
                   extra=f"Event: {event}\nSubscription-State: {state}")


def refer_sent(phone: Phone, dialog_id: str, at: float = 5.0) -> SipRequest:
    assert phone.ua.refer(dialog_id, TARGET, at)
    (sent,) = phone.ua.take_transmits()
    assert sent.peer == PBX  # only where the dialog came from, as BYE
    msg = parse_message(sent.data)
    assert isinstance(msg, SipRequest)
    return msg


def test_refer_accepted_then_notify_progress_to_200() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    msg = refer_sent(phone, dialog_id)
    assert msg.method == "REFER" and msg.uri == "sip:pbx@203.0.113.5:5062"
    assert msg.headers.get("refer-to") == f"<{TARGET}>"
    assert msg.headers.get("referred-by") == "<sip:earshot@198.51.100.7>"
    assert parse_cseq(msg.headers.get("cseq") or "") == (1, "REFER")
    assert msg.headers.get("call-id") == "call-1@203.0.113.5"
    assert msg.headers.get("contact") == "<sip:earshot@198.51.100.7:5060>"
    assert phone.ua.refer(dialog_id, TARGET, 5.01) is False  # one at a time
    assert phone.send(answer(msg, 202), at=5.1) == []
    assert phone.events() == [ReferResponse(dialog_id, 202)]

    assert status_of(phone.send(notify(dialog_id, 2, b"SIP/2.0 100 Trying\r\n"), at=5.2)) == [200]
    assert phone.events() == [ReferNotify(dialog_id, 100, "Trying", False)]
    assert status_of(phone.send(notify(dialog_id, 3, b"SIP/2.0 180 Ringing\r\n"), at=5.3)) == [200]
    assert phone.events() == [ReferNotify(dialog_id, 180, "Ringing", False)]
    ok = phone.send(notify(dialog_id, 4, b"SIP/2.0 200 OK\r\n", state="terminated;reason=noresource"), at=6.0)
    assert status_of(ok) == [200]
    assert phone.events() == [ReferNotify(dialog_id, 200, "OK", True)]
    # the subscription is over: a further NOTIFY gets 481
    assert status_of(phone.send(notify(dialog_id, 5, b"SIP/2.0 200 OK\r\n"), at=6.1)) == [481]
    assert phone.ua.dialog_count == 1  # the call itself goes on until someone sends BYE
    assert phone.ua.hangup(dialog_id, 7.0)
    (bye,) = phone.out()
    assert isinstance(bye, SipRequest) and parse_cseq(bye.headers.get("cseq") or "") == (2, "BYE")


def test_refused_refer_reports_the_status_and_takes_no_notify() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    msg = refer_sent(phone, dialog_id)
    phone.send(answer(msg, 603, "Decline"), at=5.1)
    assert phone.events() == [ReferResponse(dialog_id, 603)]
    assert status_of(phone.send(notify(dialog_id, 2, b"SIP/2.0 100 Trying\r\n"), at=5.2)) == [481]
    assert phone.ua.refer(dialog_id, TARGET, 6.0)  # a new attempt is allowed once answered


def test_failed_transfer_reported_by_final_notify() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    msg = refer_sent(phone, dialog_id)
    phone.send(answer(msg, 202), at=5.1)
    phone.events()
    phone.send(notify(dialog_id, 2, b"SIP/2.0 486 Busy Here\r\n", state="terminated"), at=5.5)
    assert phone.events() == [ReferNotify(dialog_id, 486, "Busy Here", True)]


def test_notify_may_overtake_the_202() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    msg = refer_sent(phone, dialog_id)
    assert status_of(phone.send(notify(dialog_id, 2, b"SIP/2.0 100 Trying\r\n"), at=5.05)) == [200]
    phone.send(answer(msg, 202), at=5.1)
    assert phone.events() == [ReferNotify(dialog_id, 100, "Trying", False), ReferResponse(dialog_id, 202)]


def test_unanswered_refer_times_out_as_408() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    refer_sent(phone, dialog_id, at=10.0)
    sent = phone.advance(100.0)
    assert [at for at, _ in sent][:3] == [10.5, 11.5, 13.5]  # Timer E over UDP
    assert all(isinstance(m, SipRequest) and m.method == "REFER" for _, m in sent)
    assert phone.events() == [ReferResponse(dialog_id, 408)]
    assert phone.ua.dialog_count == 1  # a lost REFER does not end the call


def test_refer_needs_a_confirmed_call_and_a_clean_uri() -> None:
    phone = Phone()
    phone.send(request("INVITE", body=b"v=0\r\n"))
    (incoming,) = phone.events()
    assert phone.ua.refer(incoming.dialog_id, TARGET, 1.0) is False  # not answered
    assert phone.ua.refer("no-such-dialog", TARGET, 1.0) is False
    phone2 = Phone()
    dialog_id, _ = phone2.call()
    for bad in ("sip:a@b>\r\nX: y", "no-scheme"):
        try:
            phone2.ua.refer(dialog_id, bad, 1.0)
        except ValueError as exc:
            assert "Refer-To" in str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted")


def test_notify_with_other_event_489_and_outside_a_dialog_405() -> None:
    phone = Phone()
    dialog_id, _ = phone.call()
    refer_sent(phone, dialog_id)
    responses = phone.send(notify(dialog_id, 2, b"SIP/2.0 100 Trying\r\n", event="dialog"))
    assert status_of(responses) == [489]
    out_of_dialog = request("NOTIFY", branch="z9hG4bKood", cseq=1, call_id="other@x", extra="Event: refer")
    (resp,) = phone.send(out_of_dialog)
    assert isinstance(resp, SipResponse) and resp.status == 405
    # a NOTIFY in a dialog with no REFER of ours: 481
    phone2 = Phone()
    d2, _ = phone2.call()
    assert status_of(phone2.send(notify(d2, 2, b"SIP/2.0 100 Trying\r\n"))) == [481]
