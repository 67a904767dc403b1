"""Property tests of the protocol cores: hostile input only ever raises the documented error.

The quick, bounded counterpart of the fuzz job (bench/fuzz/run.py, atheris, not run in
CI). Each core is fed structured-but-hostile input built by Hypothesis, and a test
fails on any exception other than the module's documented one, or on a broken
invariant (round trips, our own SDP answer re-reading as sent, audio chunks contiguous
on the call timeline). tests/unit/test_sip_fuzz.py already covers the SIP user agent
and "only FramingError" for the TCP framer; this file covers the rest, replays the
fuzz seeds and every input the fuzzer found a defect with (bench/fuzz/regressions/).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench.fuzz import targets
from gateway import sdp
from gateway.ingest.realtime.protocol import Commit, RealtimeConnection, ServerEvent
from gateway.ingest.twilio.protocol import LegAudio, TwilioStream
from gateway.rtp.dtmf import DTMF_DIGITS, DtmfDecoder
from gateway.rtp.packet import RtpError, build_rtp, parse_rtp
from gateway.rtp import receiver as receiver_module
from gateway.rtp.receiver import AudioChunk, RtpReceiver
from gateway.sip.framing import FramingError, StreamFramer
from gateway.sip.message import SipParseError, SipRequest, parse_message, serialize

FUZZ = Path(__file__).resolve().parents[2] / "bench" / "fuzz"
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- SIP message parser --------------------------------------------------------------------

HEADER_NAMES = ["Via", "v", "From", "f", "To", "t", "Call-ID", "i", "CSeq", "Contact", "m", "Max-Forwards",
                "Content-Length", "l", "Content-Type", "c", "Record-Route", "Route", "Require", "Accept",
                "Session-Expires", "Min-SE", "Authorization", "X-Foo"]
VALUE_PIECES = ["SIP/2.0/UDP 127.0.0.1:5062", ";branch=z9hG4bK1", ";rport", ";tag=ab", "<sip:a@127.0.0.1>",
                '"Bell, A" ', "sip:x@[::1]:5060", "1 INVITE", "70", "0", "12", "application/sdp", ",", ";", '"',
                "\\", "<", ">", " ", "\t", "\r", "\x00", "\xff", "%00", "999999999999", "timer", "Digest a=b, c",
                "\u00b2", "\x1d", "\u0663"]
header_value = st.lists(st.sampled_from(VALUE_PIECES) | st.text(max_size=6), max_size=6).map("".join)


@st.composite
def sip_messages(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        start = f"{draw(st.sampled_from(['INVITE', 'ACK', 'BYE', 'CANCEL', 'OPTIONS', 'X']))} " \
                f"{draw(st.sampled_from(['sip:e@127.0.0.1', 'tel:+1', 'sips:[::1]', '<x>', 'x']))} " \
                f"{draw(st.sampled_from(['SIP/2.0', 'sip/2.0', 'SIP/3.0', 'SIP/2']))}"
    else:
        start = f"SIP/2.0 {draw(st.integers(0, 1000))} {draw(st.text(max_size=8))}"
    headers = draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_value), max_size=10))
    lines = [start] + [f"{n}:{draw(st.sampled_from([' ', '', '  ']))}{v}" for n, v in headers]
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    head = eol.join(lines).encode("utf-8", "surrogateescape")
    return head + (eol * 2).encode() + draw(st.binary(max_size=40))


def comparable(msg: object) -> tuple[object, ...]:
    return targets._comparable(msg)  # type: ignore[arg-type]


@QUICK
@given(sip_messages())
def test_sip_parser_raises_only_sip_parse_error_and_round_trips(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except SipParseError as exc:
        assert exc.reason and exc.status in (400, 505)
        if exc.partial is not None:
            assert isinstance(exc.partial, SipRequest)
        return
    again = parse_message(serialize(msg))
    assert comparable(again) == comparable(msg)


# -- TCP framer ----------------------------------------------------------------------------

@st.composite
def framed_messages(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=60))
    name = draw(st.sampled_from(["Content-Length", "content-length", "l", "CONTENT-LENGTH"]))
    space = draw(st.sampled_from([" ", "", "\t", "\r\n "]))
    head = f"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK{draw(st.integers(0, 99))}\r\n" \
           f"{name}:{space}{len(body)}\r\n"
    return head.encode() + b"\r\n" + body


@QUICK
@given(st.lists(st.tuples(framed_messages(), st.sampled_from([b"", b"\r\n\r\n", b"\r\n"])), min_size=1, max_size=5),
       st.lists(st.integers(1, 200), max_size=8))
def test_framer_returns_exactly_the_messages_however_the_stream_is_cut(
        messages: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    """Messages and keep-alives in any read sizes -> the same messages, in order, once each."""
    stream = b"".join(keepalive + message for message, keepalive in messages)
    framer = StreamFramer(max_message_bytes=4096)
    out: list[bytes] = []
    pos = 0
    for size in [*cuts, len(stream)]:
        out += framer.feed(stream[pos: pos + size])
        pos += size
    assert out == [message for message, _ in messages]
    assert framer.buffered == 0


@QUICK
@given(st.lists(st.binary(max_size=300) | st.sampled_from([b"\r" * 200, b"\n" * 200, b"\r\n" * 100]), max_size=30))
def test_framer_buffers_at_most_its_limit(chunks: list[bytes]) -> None:
    framer = StreamFramer(max_message_bytes=1024)
    try:
        for chunk in chunks:
            for message in framer.feed(chunk):
                assert 0 < len(message) <= 1024
            assert framer.buffered <= 1024
    except FramingError as exc:
        assert exc.reason


# -- SDP -----------------------------------------------------------------------------------

SDP_LINES = [
    "v=0", "o=- 1 1 IN IP4 127.0.0.1", "o=- 1 1 IN IP6 ::1", "s=-", "t=0 0", "c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0",
    "c=IN IP6 ::", "c=IN IP4 224.2.1.1/127/3", "m=audio 4000 RTP/AVP 0 8 101", "m=audio 4000 RTP/SAVP 0 101",
    "m=audio 0 RTP/AVP 0", "m=video 5000 RTP/AVPF 96", "m=audio 4000/2 RTP/AVPF 8", "m=image 6000 udptl t38",
    "a=rtpmap:101 telephone-event/8000", "a=rtpmap:0 PCMU/8000", "a=rtpmap:96 opus/48000/2", "a=rtpmap:8 PCMA/16000",
    "a=fmtp:101 0-16", "a=ptime:20", "a=maxptime:40", "a=sendonly", "a=inactive", "a=recvonly", "a=sendrecv",
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:32",
    "a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj",
    "a=crypto:3 AEAD_AES_128_GCM inline:w7W5e4PuqB1VQQ5vPFM4PjlWMX7+UidJZlAaXQ==",
    "a=crypto:4 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz KDR=1",
    "m=audio \u00b2 RTP/AVP 0", "m=audio 4000 RTP/AVP \u00b2", "m=audio 4000/\u00b2 RTP/AVP 0", "a=ptime:30\x1d",
    "a=rtpmap:\u0663 PCMU/8000",
]
sdp_line = st.sampled_from(SDP_LINES) | st.builds(
    lambda kind, value: f"{kind}={value}", st.sampled_from("vosctmab" + "kiz"), st.text(max_size=30))


@st.composite
def sdp_offers(draw: st.DrawFn) -> bytes:
    lines = ["v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0"]
    lines += draw(st.lists(sdp_line, max_size=12))
    if draw(st.booleans()):
        lines = draw(st.permutations(lines))
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    return (eol.join(lines) + eol).encode("utf-8", "surrogateescape")


CR_IN_FMTP = (b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 101\r\n"
              b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\rm=video 9 RTP/AVP 0\r\n")


@QUICK
@given(sdp_offers())
@example(CR_IN_FMTP)  # found by the fuzzer: a bare CR in a=fmtp reached our answer, a line for CR-splitting peers
def test_sdp_raises_only_sdp_error_and_our_answer_is_clean(data: bytes) -> None:
    try:
        offer = sdp.parse_sdp(data)
    except sdp.SdpError as exc:
        assert exc.reason
        return
    assert sdp.parse_sdp(offer.to_bytes()).to_bytes() == offer.to_bytes()
    for policy in targets.SRTP_POLICIES:
        try:
            negotiated = targets._negotiate(offer, "198.51.100.7", policy)
        except sdp.SdpError as exc:
            assert exc.reason
            continue
        answer = negotiated.answer.to_bytes()
        assert not targets._BARE_CR_LF.search(answer), answer
        assert sdp.parse_sdp(answer).to_bytes() == answer
        targets._receiver_for(negotiated)


@pytest.mark.parametrize("line", ["m=audio \u00b2 RTP/AVP 0", "m=audio 4000 RTP/AVP \u00b2", "m=audio 4000/\u00b2 RTP/AVP 0",
                                  "m=audio 4000 RTP/AVP 0\r\na=ptime:30\x1d"])
def test_digits_int_refuses_are_an_sdp_error(line: str) -> None:
    """Found by the fuzz job (a=ptime:30 + U+001D): str.isdigit() and \\s took "\u00b2" and
    U+001D, int()/float() refused them, and the ValueError escaped the app's ``except SdpError``."""
    with pytest.raises(sdp.SdpError):
        sdp.parse_sdp(f"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\n{line}\r\n".encode())


def test_a_bare_cr_inside_an_sdp_line_is_refused() -> None:
    with pytest.raises(sdp.SdpError, match="Malformed SDP line"):
        sdp.parse_sdp(CR_IN_FMTP)


# -- RTP -----------------------------------------------------------------------------------

@QUICK
@given(st.binary(max_size=80))
def test_parse_rtp_raises_only_rtp_error(data: bytes) -> None:
    try:
        packet = parse_rtp(data)
    except RtpError:
        return
    assert 12 + 4 * packet.csrc_count + len(packet.payload) <= len(data)


@QUICK
@given(st.integers(0, 127), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.binary(max_size=40), st.booleans(), st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
       st.none() | st.tuples(st.integers(0, 0xFFFF), st.integers(0, 3).map(lambda n: bytes(4 * n))),
       st.integers(0, 255))
def test_parse_rtp_reads_back_what_build_rtp_wrote(pt: int, seq: int, ts: int, ssrc: int, payload: bytes,
                                                   marker: bool, csrcs: list[int],
                                                   extension: tuple[int, bytes] | None, padding: int) -> None:
    packet = parse_rtp(build_rtp(pt, seq, ts, ssrc, payload, marker=marker, csrcs=tuple(csrcs), extension=extension,
                                 padding=padding))
    assert (packet.payload_type, packet.sequence, packet.timestamp, packet.ssrc, packet.marker, packet.payload,
            packet.csrc_count) == (pt, seq, ts, ssrc, marker, payload, len(csrcs))
    assert packet.extension_profile == (extension[0] if extension else None)


MAX_LEAD: float | None = getattr(receiver_module, "MAX_LEAD", None)
MAX_DRIFT: float = getattr(receiver_module, "MAX_DRIFT", 0.0)
SOURCES = [("203.0.113.5", 30000), ("203.0.113.5", 30002), ("192.0.2.66", 30000), ("::ffff:203.0.113.5", 30000)]
rtp_datagram = st.one_of(
    st.builds(lambda pt, seq, ts, ssrc, payload: build_rtp(pt, seq, ts, ssrc, payload),
              st.sampled_from([0, 8, 13, 101, 96, 72]), st.integers(0, 0xFFFF),
              st.sampled_from([0, 160, 320, 8000, 0x7FFFFFFF, 0xFFFFFF00]) | st.integers(0, 0xFFFFFFFF),
              st.sampled_from([1, 2]), st.binary(max_size=200)),
    st.binary(max_size=40),
)


@QUICK
@given(st.lists(st.tuples(rtp_datagram, st.sampled_from(SOURCES), st.sampled_from([0.0, 0.02, 0.06, 0.5, 7.0]),
                          st.sampled_from(["receive", "receive", "receive", "poll", "update"])), max_size=25))
def test_rtp_receiver_never_raises_and_keeps_the_timeline_contiguous(
        steps: list[tuple[bytes, tuple[str, int], float, str]]) -> None:
    receiver = RtpReceiver(expected_host="203.0.113.5", expected_port=30000, codecs={0: "PCMU", 8: "PCMA"},
                           dtmf_payload_type=101, signalling_host="198.51.100.9")
    position = 0
    now = 100.0
    started: float | None = None

    def check(out: list[object]) -> None:
        nonlocal position
        for item in out:
            if isinstance(item, AudioChunk):
                assert item.start_sample == position and len(item.pcm) % 2 == 0
                assert 0 <= item.lost_samples <= len(item.pcm) // 2
                position += len(item.pcm) // 2
            else:
                assert item.digit in DTMF_DIGITS and item.duration_ms >= 0
        if started is not None and MAX_LEAD is not None:  # audio never runs ahead of the clock (issue 11)
            assert position <= round(((now - started) * (1 + MAX_DRIFT) + MAX_LEAD) * 8000)

    for datagram, source, step, op in steps:
        now += step
        if op == "poll":
            check(receiver.poll(now))
        elif op == "update":
            receiver.update(expected_host="0.0.0.0", expected_port=None, codecs={0: "PCMU"}, dtmf_payload_type=96)
        else:
            out = receiver.receive(datagram, source, now)
            if started is None and receiver.latched is not None:
                started = now
            check(out)
    check(receiver.flush())


@QUICK
@given(st.lists(st.tuples(st.integers(0, 0xFFFFFFFF) | st.sampled_from([8000, 8160]), st.binary(min_size=0, max_size=6)),
                max_size=30))
def test_dtmf_decoder_emits_only_digits(events: list[tuple[int, bytes]]) -> None:
    decoder = DtmfDecoder()
    out = [decoder.feed(parse_rtp(build_rtp(101, i, ts, 1, payload))) for i, (ts, payload) in enumerate(events)]
    out.append(decoder.flush())
    for event in out:
        if event is not None:
            assert event.digit in DTMF_DIGITS and event.duration_ms >= 0 and 0 <= event.volume <= 63


# -- Realtime and Twilio JSON --------------------------------------------------------------

json_leaf = st.sampled_from(list(targets.JSON_VALUES) + list(targets.JSON_STRINGS)) | st.integers() | st.floats(
    allow_nan=False) | st.text(max_size=8)
json_tree = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(targets.JSON_KEYS), inner, max_size=4), max_leaves=12)


@st.composite
def client_events(draw: st.DrawFn, kinds: list[str], key: str) -> str:
    event = draw(st.dictionaries(st.sampled_from(targets.JSON_KEYS), json_tree, max_size=4))
    if draw(st.integers(0, 5)):
        event[key] = draw(st.sampled_from(kinds))
    return json.dumps(event)


REALTIME_KINDS = ["session.update", "transcription_session.update", "transcription_session.updated",
                  "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
                  "response.create", ""]
PCM = base64.b64encode(bytes(480)).decode()


@QUICK
@given(st.dictionaries(st.sampled_from(["model", "input_audio_format", "language", "turn_detection", "threshold",
                                        "eagerness", "silence_duration_ms", "max_speech_duration_s"]),
                       st.sampled_from(["pcm_s16le_16000", "g711_ulaw", "none", "semantic_vad", "en", "x", "1e9", "-1",
                                        "0.5", ""]), max_size=4),
       st.booleans(),
       st.lists(client_events(REALTIME_KINDS, "type") | st.just(json.dumps(
           {"type": "input_audio_buffer.append", "audio": PCM})) | st.text(max_size=10), max_size=10))
@example({}, False, ['{"type": "session.update", "session": {"input_audio_format": [1]}}'])  # found by the fuzzer
@example({}, True, ['{"type": "session.update", "session": {"audio": {"input": {"turn_detection": '
                    '{"type": "semantic_vad", "eagerness": {}}}}}}'])
def test_realtime_protocol_answers_every_message_without_raising(query: dict[str, str], beta: bool,
                                                                 messages: list[str]) -> None:
    conn = RealtimeConnection(session_id="sess_1", query=query, beta=beta, clock=lambda: 1.7e9)
    assert conn.start()
    for i, message in enumerate(messages):
        for out in conn.receive(message, float(i)):
            if isinstance(out, ServerEvent):
                json.loads(out.to_json())
                if out.type == "error":
                    assert out.fields["error"]["code"] and out.fields["error"]["message"]
            elif isinstance(out, Commit):
                conn.committed(out.generation, i)
    conn.close(float(len(messages)))


def test_a_list_where_the_realtime_format_name_goes_is_an_error_event() -> None:
    conn = RealtimeConnection(session_id="sess_1")
    (out,) = conn.receive('{"type": "session.update", "session": {"input_audio_format": [1]}}', 0.0)
    assert out.type == "error" and out.fields["error"]["param"] == "session.input_audio_format"


TWILIO_KINDS = ["connected", "start", "media", "dtmf", "mark", "stop", "other"]
TWILIO_START = json.dumps({"event": "start", "start": {"streamSid": "MZ1", "tracks": ["inbound", "outbound"]}})


@QUICK
@given(st.lists(client_events(TWILIO_KINDS, "event") | st.sampled_from([TWILIO_START, json.dumps(
    {"event": "media", "media": {"payload": "//8=", "timestamp": "40"}})]), max_size=12),
       st.lists(st.sampled_from([0.0, 0.02, 1.0, 30.0]), min_size=12, max_size=12))
def test_twilio_protocol_never_raises_and_bounds_the_fill(messages: list[str], steps: list[float]) -> None:
    stream = TwilioStream(max_fill_ms=2_000, max_media_ms=1_000)
    now = 0.0
    audio = 0
    for message, step in zip(messages, steps):
        now += step
        for action in stream.receive(message, now):
            if isinstance(action, LegAudio):
                assert 0 <= action.filled <= len(action.pcm) // 2
                audio += len(action.pcm) // 2 - action.filled
    for leg in stream.legs.values():
        assert leg.fed <= round(now * 8000) + stream.max_ahead + audio
    stream.close()


# -- SIPREC body and metadata (gateway/siprec) --------------------------------------------------

XML_PIECES = ['<recording xmlns="urn:ietf:params:xml:ns:recording:1">', "</recording>", "<recording>", "<rs:recording>",
              "<participant", ' participant_id="p1"', ' participant_id="p2"', ' id="p1"', ">", "/>", "</participant>",
              '<nameID aor="sip:+15550001@x">', '<nameID aor="tel:+1-555-0002">', "</nameID>", "<name>Al</name>",
              "<stream", ' stream_id="s1"', ' stream_id="s2"', "<label>1</label>", "<label>2</label>", "</stream>",
              "<participantstreamassoc", "</participantstreamassoc>", "<send>s1</send>", "<send>s2</send>",
              "<recv>s1</recv>", "<callingParty>true</callingParty>", "<role>agent</role>", "<datamode>partial</datamode>",
              "<!DOCTYPE x>", "<!ENTITY a 'b'>", "&amp;", "&x;", "<![CDATA[", "]]>", "<!--", "-->", "<e>", "</e>", "\x00",
              "\u00b2", "<", "&", '"']
xml_docs = st.lists(st.sampled_from(XML_PIECES) | st.text(max_size=4), max_size=30).map(
    lambda pieces: "".join(pieces).encode("utf-8", "surrogatepass"))
PART_HEADS = ["Content-Type: application/sdp", "Content-Type: application/rs-metadata+xml",
              "Content-Type: application/rs-metadata\r\nContent-Disposition: recording-session", "c: text/plain",
              "Content-Transfer-Encoding: base64", "X", "", " folded"]


@st.composite
def siprec_bodies(draw: st.DrawFn) -> bytes:
    boundary = draw(st.sampled_from(["b1", "a;b", "x" * 70, ""]))
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    parts = draw(st.lists(st.tuples(st.lists(st.sampled_from(PART_HEADS), max_size=3), xml_docs), max_size=10))
    body = draw(st.sampled_from(["", "preamble" + eol]))
    for heads, content in parts:
        body += f"--{boundary}{eol}" + eol.join(heads) + eol + eol + content.decode("utf-8", "surrogatepass") + eol
    body += draw(st.sampled_from([f"--{boundary}--{eol}", "", f"--{boundary}"]))
    content_type = draw(st.sampled_from([f'multipart/mixed;boundary="{boundary}"', f"multipart/mixed; boundary={boundary}",
                                         "multipart/mixed", "application/sdp", "application/rs-metadata+xml", "", "x/y"]))
    return content_type.encode() + b"\n" + body.encode("utf-8", "surrogatepass")


@QUICK
@given(siprec_bodies())
def test_siprec_body_raises_only_siprec_error_and_takes_parts_as_they_are(data: bytes) -> None:
    targets.siprec_body_target(data)  # its invariants: parts are pieces of the body, the metadata parses or errs


@QUICK
@given(st.lists(xml_docs, min_size=1, max_size=3))
def test_siprec_metadata_raises_only_siprec_error_and_merges_keep_parties(docs: list[bytes]) -> None:
    targets.siprec_metadata_target(targets.SEP.join(b"\x00" + d for d in docs))


def test_the_siprec_targets_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A leg mapped to someone outside the metadata, and an undocumented exception, both fail the target."""
    from gateway.siprec import metadata as siprec_metadata
    from gateway.siprec.metadata import LegIdentity

    seed = (FUZZ / "seeds" / "siprec_metadata" / "cisco_cube").read_bytes()
    targets.siprec_metadata_target(seed)
    monkeypatch.setattr(siprec_metadata.RecordingMetadata, "leg_for_label",
                        lambda self, label: LegIdentity(label, "nobody", "", "", "agent"))
    with pytest.raises(targets.FuzzBug, match="not a participant"):
        targets.siprec_metadata_target(seed)
    monkeypatch.setattr(siprec_metadata, "parse_metadata", lambda xml: {}["planted"])
    with pytest.raises(KeyError):
        targets.siprec_body_target((FUZZ / "seeds" / "siprec_body" / "broadworks").read_bytes())


# -- the fuzz job's own inputs ---------------------------------------------------------------

def _inputs(folder: str) -> list[tuple[str, Path]]:
    base = FUZZ / folder
    return sorted((target.name, path) for target in base.iterdir() if target.is_dir() for path in target.iterdir())


@pytest.mark.parametrize("target,path", _inputs("seeds"), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_seed_passes_its_fuzz_target(target: str, path: Path) -> None:
    """The harness and its seeds keep working as the cores change (the fuzz job is not in CI)."""
    targets.TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target,path", _inputs("regressions"), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_input_the_fuzzer_failed_on_now_passes(target: str, path: Path) -> None:
    targets.TARGETS[target](path.read_bytes())


def test_the_fuzz_targets_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """An undocumented exception escapes a target, and the user agent's safety net (which
    swallows everything) is reported: the fuzz job cannot pass vacuously."""
    seed = (FUZZ / "seeds" / "useragent" / "call_udp").read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("planted")

    monkeypatch.setattr("gateway.sip.useragent.UserAgent._on_request", broken)
    with pytest.raises(targets.FuzzBug, match="safety net|logged an error"):
        targets.useragent(seed)
    monkeypatch.setattr(sdp, "negotiate", broken)
    with pytest.raises(KeyError):
        targets.sdp_target((FUZZ / "seeds" / "sdp" / "pcmu_pcma_dtmf").read_bytes())


def test_a_bare_cr_in_a_sip_header_gets_400_and_is_never_echoed() -> None:
    """Found by the fuzz job's invariant: a bare CR inside From (here smuggling a header)
    was kept in the value and echoed in the response, a line break to CR-splitting peers."""
    from gateway.sip.events import MalformedMessage, Peer
    from gateway.sip.useragent import UserAgent

    ua = UserAgent(local_host="127.0.0.1", local_port=5060)
    ua.receive(b"OPTIONS sip:e@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKx\r\n"
               b"From: <sip:a@127.0.0.1>;tag=1\rX-Injected: yes\r\nTo: <sip:e@127.0.0.1>\r\nCall-ID: c1\r\n"
               b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n", Peer("udp", "127.0.0.1", 5062), 0.0)
    assert [e.reason for e in ua.take_events() if isinstance(e, MalformedMessage)] == ["Bad Request - Bare CR in header"]
    (sent,) = ua.take_transmits()
    assert sent.data.startswith(b"SIP/2.0 400 Bad Request - Bare CR in header\r\n")
    assert b"X-Injected" not in sent.data and not targets._BARE_CR_LF.search(sent.data)


def test_a_session_timer_in_unicode_digits_is_ignored_not_an_internal_error() -> None:
    """"Session-Expires: \u00b2" passed str.isdigit() and made int() raise inside the user agent."""
    from gateway.sip.events import IncomingCall, MalformedMessage, Peer
    from gateway.sip.useragent import UserAgent

    body = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
    invite = ("INVITE sip:e@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKx\r\n"
              "From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:e@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n"
              "Session-Expires: \u00b2\r\nMin-SE: \u00b9\u00b2\r\nSupported: timer\r\nContent-Type: application/sdp\r\n"
              f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    ua = UserAgent(local_host="127.0.0.1", local_port=5060, session_expires=1800)
    ua.receive(invite, Peer("udp", "127.0.0.1", 5062), 0.0)
    events = ua.take_events()
    assert not [e for e in events if isinstance(e, MalformedMessage)]
    assert [type(e) for e in events if isinstance(e, IncomingCall)] == [IncomingCall]


def test_a_twilio_timestamp_in_unicode_digits_is_an_invalid_timestamp() -> None:
    stream = TwilioStream()
    stream.receive(TWILIO_START, 0.0)
    audio, error = stream.receive(json.dumps({"event": "media", "media": {"payload": "//8=", "timestamp": "\u00b2"}}), 0.0)
    assert isinstance(audio, LegAudio) and error.code == "invalid-timestamp"
