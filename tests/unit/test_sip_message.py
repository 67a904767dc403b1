"""SIP message parsing, the small header types, and serialization."""

from __future__ import annotations

import pytest

from gateway.sip.message import (
    Headers,
    NameAddress,
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    Via,
    extract_sdp,
    parse_cseq,
    parse_message,
    serialize,
)

OPTIONS = (
    b"OPTIONS sip:earshot@198.51.100.7 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKopt1\r\n"
    b"From: <sip:pbx@203.0.113.5>;tag=aa\r\n"
    b"To: <sip:earshot@198.51.100.7>\r\n"
    b"Call-ID: opt-1@203.0.113.5\r\n"
    b"CSeq: 7 OPTIONS\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def test_headers_case_insensitive_compact_and_ordered() -> None:
    h = Headers([("v", "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/TCP b;branch=z9hG4bK2"), ("VIA", "SIP/2.0/UDP c")])
    h.add("i", "abc")
    h.add("Allow", "INVITE, ACK,BYE")
    assert h.get("Via") == "SIP/2.0/UDP a;branch=z9hG4bK1"
    assert h.get_all("via") == ["SIP/2.0/UDP a;branch=z9hG4bK1", "SIP/2.0/TCP b;branch=z9hG4bK2", "SIP/2.0/UDP c"]
    assert h.get("Call-ID") == "abc" and "call-id" in h and "CALL-ID" in h
    assert h.get_all("allow") == ["INVITE", "ACK", "BYE"]
    assert h.get("missing") is None and h.get_all("missing") == []
    h.set("call-id", "xyz")
    assert [n for n, _ in h] == ["v", "VIA", "call-id", "Allow"]
    h.remove("VIA")
    assert "via" not in h and len(h) == 2


def test_list_split_respects_quotes_and_angles() -> None:
    h = Headers([("Contact", '"Bell, Alexander" <sip:a,b@x>;q=0.5, <sip:c@y>')])
    assert h.get_all("contact") == ['"Bell, Alexander" <sip:a,b@x>;q=0.5', "<sip:c@y>"]
    # Not a list header: commas are data.
    h = Headers([("Subject", "one, two")])
    assert h.get_all("subject") == ["one, two"]


def test_parse_request_basics() -> None:
    req = parse_message(OPTIONS)
    assert isinstance(req, SipRequest)
    assert (req.method, req.uri, req.body) == ("OPTIONS", "sip:earshot@198.51.100.7", b"")
    assert req.headers.get("cseq") == "7 OPTIONS"


def test_leading_crlf_and_folding_and_lws() -> None:
    data = (
        b"\r\n\r\nOPTIONS sip:x@y SIP/2.0\r\n"
        b"Via  :  SIP / 2.0 / UDP\r\n   host.example.com ; branch = z9hG4bK77 ; rport\r\n"
        b"f: A B <sip:a@b>\r\n  ;tag=1\r\nt:sip:x@y\r\ni: c\r\nCSeq:\t1\r\n\tOPTIONS\r\nl: 0\r\n\r\n"
    )
    req = parse_message(data)
    via = Via.parse(req.headers.get("via") or "")
    assert (via.transport, via.host, via.port, via.branch, via.rport) == ("UDP", "host.example.com", None, "z9hG4bK77", True)
    assert NameAddress.parse(req.headers.get("from") or "").tag == "1"
    assert parse_cseq(req.headers.get("cseq") or "") == (1, "OPTIONS")


def test_bare_lf_line_ends_are_tolerated() -> None:
    req = parse_message(OPTIONS.replace(b"\r\n", b"\n"))
    assert isinstance(req, SipRequest) and req.headers.get("call-id") == "opt-1@203.0.113.5"


def test_udp_body_rules() -> None:
    head = OPTIONS.replace(b"Content-Length: 0\r\n", b"")
    # No Content-Length on UDP: the body is the rest of the datagram.
    assert parse_message(head + b"hello").body == b"hello"
    # Extra bytes past Content-Length are ignored.
    assert parse_message(OPTIONS.replace(b"Length: 0", b"Length: 3") + b"abcdef").body == b"abc"
    # Truncated body is an error with a specific reason.
    with pytest.raises(SipParseError) as info:
        parse_message(OPTIONS.replace(b"Length: 0", b"Length: 30") + b"abc")
    assert info.value.reason == "Bad Request - Content-Length mismatch"
    assert info.value.partial is not None and info.value.partial.headers.get("call-id") == "opt-1@203.0.113.5"


@pytest.mark.parametrize(
    ("replace", "reason"),
    [
        ((b"Call-ID: opt-1@203.0.113.5\r\n", b""), "Bad Request - Missing Call-ID"),
        ((b"Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKopt1\r\n", b""), "Bad Request - Missing Via"),
        ((b"To: <sip:earshot@198.51.100.7>\r\n", b""), "Bad Request - Missing To"),
        ((b"CSeq: 7 OPTIONS", b"CSeq: 7 INVITE"), "Bad Request - CSeq method mismatch"),
        ((b"CSeq: 7 OPTIONS", b"CSeq: 99999999999 OPTIONS"), "Bad Request - CSeq number out of range"),
        ((b"CSeq: 7 OPTIONS", b"CSeq: seven OPTIONS"), "Bad Request - Malformed CSeq"),
        ((b"Content-Length: 0", b"Content-Length: -1"), "Bad Request - Invalid Content-Length"),
        ((b"Content-Length: 0", b"Content-Length: 99999999999999999999"), "Bad Request - Invalid Content-Length"),
        ((b"Content-Length: 0", b"Content-Length: 0\r\nl: 5"), "Bad Request - Multiple Content-Length"),
        ((b"Max-Forwards: 70", b"Max-Forwards: 300"), "Bad Request - Invalid Max-Forwards"),
        ((b"branch=z9hG4bKopt1", b"branch=z9hG4bKopt1;;"), "Bad Request - Malformed Via"),
        ((b"<sip:earshot@198.51.100.7>\r\n", b"< sip:earshot@198.51.100.7>\r\n"), "Bad Request - Malformed To"),
        ((b"From: <sip:", b'From: "unbalanced <sip:'), "Bad Request - Unterminated quoted string in From"),
        ((b"Max-Forwards: 70\r\n", b"no colon here\r\n"), "Bad Request - Malformed header line"),
        ((b"OPTIONS sip:earshot", b"OPTIONS  sip:earshot"), "Bad Request - Malformed Request-Line"),
        ((b"OPTIONS sip:earshot@198.51.100.7 ", b"OPTIONS <sip:earshot@198.51.100.7> "), "Bad Request - Malformed Request-URI"),
    ],
)
def test_request_errors_name_the_fault(replace: tuple[bytes, bytes], reason: str) -> None:
    data = OPTIONS.replace(*replace)
    assert data != OPTIONS
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert info.value.reason == reason and info.value.status == 400
    assert info.value.partial is not None and info.value.partial.method == "OPTIONS"


def test_unsupported_version_is_505() -> None:
    with pytest.raises(SipParseError) as info:
        parse_message(OPTIONS.replace(b" SIP/2.0\r\n", b" SIP/7.0\r\n", 1))
    assert info.value.status == 505 and info.value.partial is not None


def test_garbage_never_raises_anything_but_parse_error() -> None:
    for data in (b"", b"\r\n", b"\x00\xff\xfe", b"HELLO", b"SIP/2.0 abc", b"INVITE\r\n\r\n", b":\r\n\r\n"):
        with pytest.raises(SipParseError):
            parse_message(data)


def test_parse_responses() -> None:
    base = (
        b"Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKbye1\r\nFrom: <sip:a@b>;tag=1\r\n"
        b"To: <sip:c@d>;tag=2\r\nCall-ID: r1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    resp = parse_message(b"SIP/2.0 200 OK\r\n" + base)
    assert isinstance(resp, SipResponse) and (resp.status, resp.reason) == (200, "OK")
    # Empty and exotic reason phrases are fine (RFC 4475 noreason/unreason).
    assert parse_message(b"SIP/2.0 100 \r\n" + base).reason == ""  # type: ignore[union-attr]
    odd = parse_message("SIP/2.0 200 = 2**3 * 5**2 но сто девяносто девять\r\n".encode() + base)
    assert isinstance(odd, SipResponse) and odd.reason.endswith("девять")
    for bad in (b"SIP/2.0 4294967301 big\r\n", b"SIP/2.0 99 low\r\n", b"SIP/2.0 7000 x\r\n"):
        with pytest.raises(SipParseError):
            parse_message(bad + base)


def test_non_utf8_bytes_survive_a_round_trip() -> None:
    data = OPTIONS.replace(b"<sip:pbx", b"\xff\xfe <sip:pbx").replace(b"From: ", b'From: "')
    data = data.replace(b"\xff\xfe <", b'\xff\xfe" <')
    req = parse_message(data)
    assert b'"\xff\xfe" <sip:pbx@203.0.113.5>;tag=aa' in serialize(req)


def test_serialize_sets_content_length() -> None:
    req = parse_message(OPTIONS)
    assert isinstance(req, SipRequest)
    req.body = b"0123456789"
    wire = serialize(req)
    assert b"Content-Length: 10\r\n" in wire and wire.endswith(b"\r\n\r\n0123456789")
    assert wire.count(b"Content-Length") == 1
    again = parse_message(wire)
    assert again.body == req.body and serialize(again) == wire
    resp = SipResponse(486, "Busy Here", Headers([("l", "99")]), b"")
    assert serialize(resp) == b"SIP/2.0 486 Busy Here\r\nl: 0\r\n\r\n"


def test_via_and_uri_and_name_address() -> None:
    via = Via.parse("SIP/2.0/TCP [2001:db8::1]:5070;branch=z9hG4bKx;received=192.0.2.1;rport=1234")
    assert (via.host, via.port, via.received, via.params["rport"]) == ("2001:db8::1", 5070, "192.0.2.1", "1234")
    assert str(via) == "SIP/2.0/TCP [2001:db8::1]:5070;branch=z9hG4bKx;received=192.0.2.1;rport=1234"
    assert via.sent_by() == ("2001:db8::1", 5070)
    for bad in ("SIP/2.0 host", "SIP/3.0/UDP host", "SIP/2.0/UDP host:99999", "SIP/2.0/UDP host;branch="):
        with pytest.raises(ValueError):
            Via.parse(bad)

    uri = SipUri.parse("sip:user;par=u%40example.net@example.com:5080;transport=tcp;lr?subject=x")
    assert (uri.user, uri.host, uri.port, uri.params, uri.headers) == (
        "user;par=u%40example.net", "example.com", 5080, {"transport": "tcp", "lr": None}, "subject=x",
    )
    assert str(uri) == "sip:user;par=u%40example.net@example.com:5080;transport=tcp;lr?subject=x"
    assert SipUri.parse("sips:[2001:db8::5]").host == "2001:db8::5"
    for bad in ("tel:+123", "sip:", "sip:a b@c", "sip:@host", "sip:host:0"):
        with pytest.raises(ValueError):
            SipUri.parse(bad)

    na = NameAddress.parse('"J Rosenberg \\\\\\"" <sip:j@example.com> ; tag = 98asjd8')
    assert (na.display_name, na.uri, na.tag) == ('J Rosenberg \\\\\\"', "sip:j@example.com", "98asjd8")
    na = NameAddress.parse("caller<sip:caller@example.com>;tag=323")
    assert (na.display_name, na.uri, na.tag) == ("caller", "sip:caller@example.com", "323")
    na = NameAddress.parse("sip:a@b;tag=x")  # addr-spec form: params belong to the header
    assert (na.uri, na.tag) == ("sip:a@b", "x")
    assert str(NameAddress("sip:a@b", "Bell, Alexander", {"tag": "1"})) == '"Bell, Alexander" <sip:a@b>;tag=1'
    for bad in ("Bell, Alexander <sip:a@b>", "<sip:a@b", '"open <sip:a@b>', "<>", "<sip:a@b> junk"):
        with pytest.raises(ValueError):
            NameAddress.parse(bad)


def test_extract_sdp_from_multipart() -> None:
    body = (
        b"--7a9cbec02ceef655\r\nContent-Type: application/sdp\r\n\r\nv=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n"
        b"\r\n--7a9cbec02ceef655\r\nContent-Type: application/ISUP;version=itu-t92+\r\n\r\n\x01\x00\xff\r\n"
        b"--7a9cbec02ceef655--\r\n"
    )
    sdp = extract_sdp('multipart/mixed; boundary="7a9cbec02ceef655"', body)
    assert sdp == b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\n"
    assert extract_sdp("application/sdp", b"v=0") == b"v=0"
    assert extract_sdp("text/plain", b"v=0") is None
    assert extract_sdp("multipart/mixed", body) is None  # no boundary
    assert extract_sdp("multipart/mixed;boundary=zz", body) is None


def test_thousands_of_headers_are_refused_cheaply_with_an_addressable_partial(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap by construction (no stopwatch: that fails on a loaded machine): only the first
    MAX_HEADER_LINES lines, each cut to MAX_HEADER_LINE, are ever parsed into headers."""
    from gateway.sip import message
    from gateway.sip.message import MAX_HEADER_LINE, MAX_HEADER_LINES, SipParseError

    parsed: list[list[str]] = []
    real = message._parse_header_lines

    def counting(lines, headers):  # type: ignore[no-untyped-def]
        parsed.append(list(lines))
        return real(lines, headers)

    monkeypatch.setattr(message, "_parse_header_lines", counting)
    head = (b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\nFrom: <sip:x@y>;tag=1\r\n"
            b"To: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n")
    for data, reason in ((head + b"X-A: b\r\n" * 7000 + b"\r\n", "Bad Request - Too Many Headers"),
                         (head + b"X-A: " + b"b" * 60000 + b"\r\n\r\n", "Bad Request - Header Line Too Long")):
        parsed.clear()
        with pytest.raises(SipParseError) as info:
            parse_message(data)
        assert parsed and all(len(lines) <= MAX_HEADER_LINES for lines in parsed)
        assert all(len(line) <= MAX_HEADER_LINE for lines in parsed for line in lines)
        assert info.value.reason == reason
        assert info.value.partial is not None and info.value.partial.headers.get("via")
    ok = head + b"X-A: b\r\n" * (MAX_HEADER_LINES - 6) + b"\r\n"
    assert parse_message(ok).method == "INVITE"  # type: ignore[union-attr]
