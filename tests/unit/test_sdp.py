"""SDP parsing/serialization and listener-side offer/answer."""

from __future__ import annotations

import pytest

from gateway.sdp import (
    NoAcceptableCodec,
    SdpError,
    SessionDescription,
    build_offer,
    negotiate,
    parse_sdp,
    read_answer,
    serialize_sdp,
)


def offer(media: str, *, session: str = "c=IN IP4 203.0.113.5\r\n") -> SessionDescription:
    text = "v=0\r\no=pbx 123 456 IN IP4 203.0.113.5\r\ns=call\r\n" + session + "t=0 0\r\n" + media
    return parse_sdp(text.encode())


def answer_for(sd: SessionDescription, **kw: object) -> object:
    args = {"local_host": "198.51.100.7", "local_port": 40000, "session_id": 99, "session_version": 1}
    args.update(kw)
    return negotiate(sd, **args)  # type: ignore[arg-type]


# -- codec choice -----------------------------------------------------------


def test_pcmu_only_static_payload_without_rtpmap() -> None:
    n = answer_for(offer("m=audio 30000 RTP/AVP 0\r\n"))
    assert (n.payload_type, n.codec) == (0, "PCMU")
    assert (n.remote_host, n.remote_port) == ("203.0.113.5", 30000)
    audio = n.answer.media[0]
    assert audio.port == 40000 and audio.formats == ["0"] and audio.direction == "recvonly"
    assert n.dtmf_payload_type is None and n.on_hold is False and n.ptime_ms == 20


def test_pcma_only() -> None:
    n = answer_for(offer("m=audio 30000 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n"))
    assert (n.payload_type, n.codec) == (8, "PCMA")


@pytest.mark.parametrize(("formats", "expected"), [("0 8", (0, "PCMU")), ("8 0", (8, "PCMA"))])
def test_offerer_order_wins(formats: str, expected: tuple[int, str]) -> None:
    n = answer_for(offer(f"m=audio 30000 RTP/AVP 18 {formats} 101\r\n"))
    assert (n.payload_type, n.codec) == expected
    # Our codec list order does not override the offerer's preference.
    n2 = answer_for(offer(f"m=audio 30000 RTP/AVP {formats}\r\n"), codecs=("PCMA", "PCMU"))
    assert (n2.payload_type, n2.codec) == expected


def test_dynamic_payload_matched_by_rtpmap_name_and_rate() -> None:
    sd = offer(
        "m=audio 30000 RTP/AVP 96 97\r\na=rtpmap:96 opus/48000/2\r\na=rtpmap:97 pcmu/8000\r\n"
    )
    n = answer_for(sd)
    assert (n.payload_type, n.codec) == (97, "PCMU")
    # PCMU at the wrong clock rate is not PCMU we can decode.
    with pytest.raises(NoAcceptableCodec):
        answer_for(offer("m=audio 30000 RTP/AVP 97\r\na=rtpmap:97 PCMU/16000\r\n"))


def test_telephone_event_at_whatever_pt_offered() -> None:
    sd = offer(
        "m=audio 30000 RTP/AVP 8 0 118 101\r\na=rtpmap:118 telephone-event/8000\r\n"
        "a=fmtp:118 0-16\r\na=rtpmap:101 telephone-event/48000\r\na=ptime:30\r\n"
    )
    n = answer_for(sd)
    assert n.dtmf_payload_type == 118  # the 48 kHz one is ignored
    audio = n.answer.media[0]
    assert audio.formats == ["8", "118"]
    assert audio.fmtp == {118: "0-16"} and str(audio.rtpmap[118]) == "telephone-event/8000"
    assert n.ptime_ms == 30 and audio.ptime == 30
    text = n.answer.to_bytes().decode()
    assert "a=rtpmap:118 telephone-event/8000\r\n" in text and "m=audio 40000 RTP/AVP 8 118\r\n" in text


def test_no_acceptable_codec() -> None:
    with pytest.raises(NoAcceptableCodec):
        answer_for(offer("m=audio 30000 RTP/AVP 18 9\r\na=rtpmap:18 G729/8000\r\n"))
    with pytest.raises(NoAcceptableCodec):
        answer_for(offer("m=video 30000 RTP/AVP 31\r\n"))
    # SRTP-only audio is not something we can take either.
    with pytest.raises(NoAcceptableCodec):
        answer_for(offer("m=audio 30000 RTP/SAVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:x\r\n"))
    assert issubclass(NoAcceptableCodec, SdpError)


# -- direction and hold -----------------------------------------------------


@pytest.mark.parametrize(
    ("attr", "answer_dir", "hold"),
    [
        ("", "recvonly", False),
        ("a=sendrecv\r\n", "recvonly", False),
        ("a=sendonly\r\n", "recvonly", True),
        ("a=inactive\r\n", "inactive", True),
        ("a=recvonly\r\n", "inactive", False),
    ],
)
def test_direction_answers(attr: str, answer_dir: str, hold: bool) -> None:
    n = answer_for(offer("m=audio 30000 RTP/AVP 0\r\n" + attr))
    assert n.answer.media[0].direction == answer_dir
    assert n.on_hold is hold
    assert n.remote_direction == (attr[2:-2] or "sendrecv")


def test_session_level_direction_inherited() -> None:
    sd = offer("m=audio 30000 RTP/AVP 0\r\n", session="c=IN IP4 203.0.113.5\r\na=sendonly\r\n")
    n = answer_for(sd)
    assert n.remote_direction == "sendonly" and n.on_hold


def test_rfc2543_hold_with_zero_address() -> None:
    sd = offer("m=audio 30000 RTP/AVP 0\r\n", session="c=IN IP4 0.0.0.0\r\n")
    n = answer_for(sd)
    assert n.on_hold and n.remote_host == "0.0.0.0" and n.remote_direction == "sendrecv"


def test_media_level_connection_overrides_session() -> None:
    sd = offer("m=audio 30000 RTP/AVP 0\r\nc=IN IP4 192.0.2.99\r\n")
    assert answer_for(sd).remote_host == "192.0.2.99"


# -- multiple streams -------------------------------------------------------


def test_multiple_m_lines_one_audio_used_rest_rejected() -> None:
    sd = offer(
        "m=video 5000 RTP/AVP 31\r\n"
        "m=audio 6000 RTP/AVP 18\r\n"  # audio we cannot decode
        "m=audio 7000 RTP/AVP 0\r\n"
        "m=audio 8000 RTP/AVP 8\r\n"
        "m=application 9 TCP/BFCP *\r\n"
    )
    n = answer_for(sd)
    assert n.remote_port == 7000
    ports = [(m.media, m.port, m.formats) for m in n.answer.media]
    assert ports == [
        ("video", 0, ["31"]),
        ("audio", 0, ["18"]),
        ("audio", 40000, ["0"]),
        ("audio", 0, ["8"]),
        ("application", 0, ["*"]),
    ]
    # RFC 3264: the answer has exactly as many m= lines as the offer.
    reparsed = parse_sdp(n.answer.to_bytes())
    assert len(reparsed.media) == 5


def test_disabled_audio_stream_is_skipped() -> None:
    n = answer_for(offer("m=audio 0 RTP/AVP 0\r\nm=audio 7000 RTP/AVP 8\r\n"))
    assert n.remote_port == 7000 and n.codec == "PCMA"


# -- parse / serialize ------------------------------------------------------


def test_round_trip_keeps_unknown_attributes() -> None:
    text = (
        "v=0\r\no=- 1 2 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nb=AS:64\r\nt=0 0\r\n"
        "a=group:BUNDLE audio\r\nm=audio 4000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n"
        "a=rtcp:4001\r\na=x-unknown\r\n"
    )
    sd = SessionDescription.parse(text.encode())
    assert sd.attributes == [("group", "BUNDLE audio")]
    assert sd.media[0].attributes == [("rtcp", "4001"), ("x-unknown", None)]
    assert serialize_sdp(sd).decode() == text


def test_bare_lf_and_ipv6() -> None:
    sd = parse_sdp(b"v=0\no=- 1 1 IN IP6 2001:db8::1\ns=-\nc=IN IP6 2001:db8::2\nt=0 0\nm=audio 4000 RTP/AVP 0\n")
    n = negotiate(sd, local_host="2001:db8::7", local_port=4002, session_id=1, session_version=1)
    assert n.remote_host == "2001:db8::2"
    assert "c=IN IP6 2001:db8::7\r\n" in n.answer.to_bytes().decode()


def test_broken_rtpmap_costs_only_that_payload() -> None:
    # RFC 4475's torture INVITE carries "a=rtpmap:31 LPC" (no clock rate).
    sd = offer("m=audio 49217 RTP/AVP 0 12\r\nm=video 3227 RTP/AVP 31\r\na=rtpmap:31 LPC\r\n")
    assert answer_for(sd).codec == "PCMU"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "Empty"),
        (b"o=- 1 1 IN IP4 1.2.3.4\r\nv=0\r\n", "v=0"),
        (b"v=1\r\no=- 1 1 IN IP4 1.2.3.4\r\n", "v=0"),
        (b"v=0\r\ns=-\r\nt=0 0\r\n", "o="),
        (b"v=0\r\no=- 1 IN IP4 1.2.3.4\r\n", "o="),
        (b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nthis is not sdp\r\n", "line 3"),
        (b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4\r\n", "c="),
        (b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 <script>\r\n", "c="),
        (b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 99999 RTP/AVP 0\r\n", "port"),
        (b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0 abc\r\n", "payload"),
        (b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 300\r\n", "payload"),
        (b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000\r\n", "m="),
        (b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=ptime:abc\r\n", "ptime"),
        (b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=fmtp:x y\r\n", "fmtp"),
        (b"\xff\xfe" * 40000, "too large"),
    ],
)
def test_malformed_sdp(data: bytes, fragment: str) -> None:
    with pytest.raises(SdpError) as info:
        parse_sdp(data)
    assert fragment in info.value.reason


def test_missing_connection_for_audio_is_an_error() -> None:
    sd = parse_sdp(b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n")
    with pytest.raises(SdpError) as info:
        answer_for(sd)
    assert "c=" in info.value.reason


def test_answer_origin_and_versions() -> None:
    n = answer_for(offer("m=audio 30000 RTP/AVP 0\r\n"), session_id=4242, session_version=7)
    text = n.answer.to_bytes().decode()
    assert text.startswith("v=0\r\no=earshot 4242 7 IN IP4 198.51.100.7\r\ns=Earshot\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\n")


# -- offerless re-INVITE: our offer, their answer ----------------------------


def test_build_offer_and_read_answer() -> None:
    ours = build_offer(local_host="198.51.100.7", local_port=40000, session_id=5, session_version=2)
    text = ours.to_bytes().decode()
    assert "m=audio 40000 RTP/AVP 0 8 101\r\n" in text and "a=recvonly\r\n" in text
    assert "a=rtpmap:101 telephone-event/8000\r\n" in text
    theirs = parse_sdp(
        b"v=0\r\no=pbx 1 2 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n"
        b"m=audio 31000 RTP/AVP 8 101\r\na=sendonly\r\n"
    )
    n = read_answer(ours, theirs)
    assert (n.payload_type, n.codec, n.dtmf_payload_type) == (8, "PCMA", 101)
    assert (n.remote_host, n.remote_port, n.remote_direction, n.on_hold) == ("203.0.113.5", 31000, "sendonly", True)
    with pytest.raises(NoAcceptableCodec):
        read_answer(ours, parse_sdp(b"v=0\r\no=- 1 2 IN IP4 1.1.1.1\r\nc=IN IP4 1.1.1.1\r\nm=audio 0 RTP/AVP 0\r\n"))


def test_build_offer_dynamic_codecs_avoid_dtmf_pt() -> None:
    ours = build_offer(
        local_host="10.0.0.1", local_port=4000, codecs=("PCMU", "L16", "X"), session_id=1, session_version=1,
        dtmf_payload_type=96,
    )
    audio = ours.media[0]
    assert audio.formats == ["0", "97", "98", "96"]
    assert str(audio.rtpmap[97]) == "L16/8000" and str(audio.rtpmap[96]) == "telephone-event/8000"
