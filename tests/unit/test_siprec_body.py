"""gateway.siprec.body: a SIPREC request body split into SDP and recording metadata."""

from __future__ import annotations

import pytest

from gateway import sdp
from gateway.siprec.body import MAX_BODY, MAX_PARTS, RecordingBody, SiprecError, split_body
from tests.siprec_samples import NAMES, load, split

SDP = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\na=label:1\r\n"
XML = b'<recording xmlns="urn:ietf:params:xml:ns:recording:1"><datamode>complete</datamode></recording>'


def multipart(*parts: tuple[str, bytes], boundary: str = "b1", eol: bytes = b"\r\n", close: bool = True) -> bytes:
    out = b""
    for head, content in parts:
        out += b"--" + boundary.encode() + eol + head.encode().replace(b"\n", eol) + eol + eol + content + eol
    return out + (b"--" + boundary.encode() + b"--" + eol if close else b"")


def labels(offer: bytes) -> list[str]:
    parsed = sdp.parse_sdp(offer)
    assert [parsed.direction_of(md) for md in parsed.media] == ["sendonly"] * len(parsed.media)
    return [value or "" for md in parsed.media for name, value in md.attributes if name == "label"]


EXPECTED_LABELS = {
    "cisco_cube": ["1", "2"], "oracle_acme": ["1001", "1002"], "avaya_sbce_invite": ["caller-stream", "callee-stream"],
    "sonus_ribbon": ["1", "2"], "audiocodes": ["1", "2"], "broadworks": ["1", "2"],
}


@pytest.mark.parametrize("crlf", [True, False], ids=["crlf", "bare-lf"])
@pytest.mark.parametrize("name", sorted(EXPECTED_LABELS))
def test_every_vendor_invite_splits_into_its_sdp_and_metadata(name: str, crlf: bool) -> None:
    content_type, body = split(load(name, crlf=crlf))
    got = split_body(content_type, body)
    assert got.metadata_type == "application/rs-metadata+xml"
    assert got.metadata is not None and got.metadata.lstrip().startswith(b"<?xml")
    assert got.metadata.rstrip().endswith(b"recording>")  # </recording> or </rs:recording>
    assert got.sdp.startswith(b"v=0")
    assert labels(got.sdp.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")) == EXPECTED_LABELS[name]
    assert not got.sdp.endswith(b"\n\n") and not got.sdp.endswith(b"\r\n\r\n")  # the delimiter's line break is not SDP


def test_every_sample_is_tested() -> None:
    assert set(NAMES) == set(EXPECTED_LABELS) | {"avaya_sbce_reinvite"}


def test_broadworks_puts_the_metadata_first_and_it_still_splits() -> None:
    content_type, body = split(load("broadworks"))
    assert body.index(b"rs-metadata") < body.index(b"application/sdp")
    got = split_body(content_type, body)
    assert got.sdp.startswith(b"v=0") and b"recording" not in got.sdp


def test_a_metadata_only_reinvite_has_no_sdp() -> None:
    content_type, body = split(load("avaya_sbce_reinvite"))
    got = split_body(content_type, body)
    assert got == RecordingBody(b"", body, "application/rs-metadata+xml")


def test_plain_sdp_and_plain_metadata_bodies() -> None:
    assert split_body("application/sdp", SDP) == RecordingBody(SDP, None, None)
    assert split_body("Application/SDP; charset=utf-8", SDP).sdp == SDP
    assert split_body("application/rs-metadata", XML) == RecordingBody(b"", XML, "application/rs-metadata")
    assert split_body("", b"") == RecordingBody(b"", None, None)


@pytest.mark.parametrize("content_type", [
    'multipart/mixed;boundary="b1"', "multipart/mixed; boundary=b1", "Multipart/Mixed;BOUNDARY=b1;charset=x",
    'multipart/mixed; foo="x;boundary=no"; boundary="b1"',
])
def test_the_boundary_quoted_or_not(content_type: str) -> None:
    body = multipart(("Content-Type: application/sdp", SDP), ("Content-Type: application/rs-metadata+xml", XML))
    assert split_body(content_type, body) == RecordingBody(SDP, XML, "application/rs-metadata+xml")


def test_a_quoted_boundary_may_hold_a_semicolon() -> None:
    body = multipart(("Content-Type: application/sdp", SDP), ("Content-Type: application/rs-metadata", XML),
                     boundary="a;b c")
    got = split_body('multipart/mixed;boundary="a;b c"', body)
    assert (got.sdp, got.metadata, got.metadata_type) == (SDP, XML, "application/rs-metadata")


def test_lenient_framing_preamble_epilogue_no_close_no_disposition_other_parts() -> None:
    body = (b"This is a preamble.\r\n" + multipart(
        ("Content-Type: application/isup;version=itu-t92+\nContent-Disposition: signal;handling=optional", b"\x01\x02"),
        ("content-type: application/rs-metadata+xml", XML),
        ("Content-Type:application/sdp", SDP), close=False))
    got = split_body("multipart/mixed;boundary=b1", body)
    assert got.sdp == SDP and got.metadata == XML
    closed = multipart(("Content-Type: application/sdp", SDP)) + b"epilogue --b1\r\n"
    assert split_body("multipart/mixed;boundary=b1", closed) == RecordingBody(SDP, None, None)


def test_a_line_that_only_starts_like_the_delimiter_is_content() -> None:
    content = SDP + b"--b1x not a delimiter\r\n"
    body = multipart(("Content-Type: application/sdp", content))
    assert split_body("multipart/mixed;boundary=b1", body).sdp == content


def test_metadata_for_another_disposition_is_not_taken() -> None:
    body = multipart(("Content-Type: application/sdp", SDP),
                     ("Content-Type: application/rs-metadata+xml\nContent-Disposition: render", XML))
    assert split_body("multipart/mixed;boundary=b1", body).metadata is None


def test_a_folded_part_header_is_read() -> None:
    body = multipart(("Content-Type:\n application/rs-metadata+xml\nContent-Disposition: recording-session;\n"
                      " handling=required", XML), ("Content-Type: application/sdp", SDP))
    assert split_body("multipart/mixed;boundary=b1", body).metadata == XML


@pytest.mark.parametrize("content_type,body,reason", [
    ("multipart/mixed", b"--b1\r\n\r\nx\r\n--b1--", "multipart without boundary"),
    ("multipart/mixed;boundary=", b"x", "multipart without boundary"),
    ("multipart/mixed;boundary=zz", multipart(("Content-Type: application/sdp", SDP)), "boundary not found"),
    ("multipart/mixed;boundary=b1", multipart(("Content-Type: application/sdp", SDP), ("Content-Type: application/sdp",
                                                                                        SDP)), "two SDP parts"),
    ("multipart/mixed;boundary=b1", multipart(("Content-Type: application/rs-metadata", XML),
                                              ("Content-Type: application/rs-metadata+xml", XML)), "two metadata parts"),
    ("multipart/mixed;boundary=b1", multipart(("Content-Type: application/sdp\nContent-Transfer-Encoding: base64",
                                               b"dj0w")), "Content-Transfer-Encoding base64"),
    ("multipart/mixed;boundary=b1", multipart(("Content-Type application/sdp", SDP)), "part 1: bad header line"),
    ("text/plain", b"hello", "unsupported body type text/plain"),
    ("", b"v=0", "body without Content-Type"),
    ("multipart/mixed;boundary=" + "x" * 201, b"", "boundary too long"),
])
def test_bad_bodies_name_what_is_wrong(content_type: str, body: bytes, reason: str) -> None:
    with pytest.raises(SiprecError) as caught:
        split_body(content_type, body)
    assert reason in caught.value.reason
    assert caught.value.phrase == f"Bad Request - {caught.value.reason}"
    assert isinstance(caught.value, ValueError)


def test_the_work_is_bounded_parts_and_bytes() -> None:
    parts = [("Content-Type: text/plain", b"x")] * MAX_PARTS
    assert split_body("multipart/mixed;boundary=b1", multipart(*parts)) == RecordingBody(b"", None, None)
    with pytest.raises(SiprecError, match=f"more than {MAX_PARTS} parts"):
        split_body("multipart/mixed;boundary=b1", multipart(*parts, ("Content-Type: application/sdp", SDP)))
    with pytest.raises(SiprecError, match="body over"):
        split_body("application/sdp", b"v" * (MAX_BODY + 1))


def test_a_reason_is_short_printable_ascii_whatever_the_input() -> None:
    with pytest.raises(SiprecError) as caught:
        split_body("t\u00e9xt/\r\nplain\x00" + "y" * 300, b"x")
    reason = caught.value.reason
    assert reason.isascii() and reason.isprintable() and len(reason) <= 120
    assert SiprecError("caf\u00e9\r\n").reason == "caf???"


@pytest.mark.parametrize("crlf", [True, False], ids=["crlf", "bare-lf"])
@pytest.mark.parametrize("name", NAMES)
def test_every_sample_is_a_sip_request_the_parser_reads_whole(name: str, crlf: bool) -> None:
    """The samples are real SIP: the gateway's parser reads them (Content-Length right), and its
    Content-Type and body split the same as the test helper's."""
    from gateway.sip.message import SipRequest, parse_message

    msg = parse_message(load(name, crlf=crlf))
    assert isinstance(msg, SipRequest) and msg.method == "INVITE"
    assert any(v.strip().lower() == "siprec" for v in msg.headers.get_all("require"))
    content_type, body = split(load(name, crlf=crlf))
    assert msg.body == body and split_body(msg.headers.get("content-type") or "", msg.body).metadata is not None
