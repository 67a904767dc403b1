"""Earshot as a SIPREC recording server (RFC 7866), wired through the gateway.

The user agent's side (``Require: siprec`` taken, ``+sip.src`` recognised, metadata-only
UPDATEs passed on), the SDP answer of a recording offer (gateway/sdp.py), the legs a
recording's metadata maps to (gateway/srs.py), and whole calls through a real
:class:`~gateway.app.Gateway` in this process: a hand-written SRC sends the multipart
INVITE, both parties' fixture speech on two RTP streams from one source port (as sipp
and many SBCs do), a re-INVITE that adds a stream and a participant, a metadata-only
UPDATE; the assertions are on the wire (status, SDP) and on the events in Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway import sdp
from gateway.app import Gateway
from gateway.asr.stub import StubTranscriber
from gateway.config import load_settings
from gateway.dialplan import Dialplan
from gateway.events import CALL_STARTED, CallInfo, Event, EventError, EventFactory, Source
from gateway.sip.events import IncomingCall, Peer, ReInvite
from gateway.sip.message import SipResponse, parse_message
from gateway.sip.useragent import UserAgent, has_metadata, is_siprec
from tests.conftest import REDIS_URL
from tests.fixtures_data import read_g711
from tests.unit.test_gateway_failures import Caller, SipPeer, free_rtp_range, published_events, wait_until

BOUNDARY = "OSS-unique-boundary-42"
CUSTOMER_FIXTURE = "prompt_pls-hold-while-try.wav"  # "Please hold while we try to connect you."
AGENT_FIXTURE = "prompt_agent-loginok.wav"  # "Agent logged in."


# -- the SRC's messages, written from RFC 7866 / RFC 7865 -------------------------------------------

def recording_sdp(streams: list[tuple[str, int]], *, version: int = 1, host: str = "127.0.0.1",
                  media_level_c: bool = True, extra: str = "") -> bytes:
    """One ``sendonly`` PCMU m-line per (label, port); ``c=`` on each m-line (Sonus/Ribbon)."""
    lines = ["v=0", f"o=SRC 2890844526 {version} IN IP4 {host}", "s=SIPREC", "t=0 0"]
    if not media_level_c:
        lines.append(f"c=IN IP4 {host}")
    for label, port in streams:
        lines.append(f"m=audio {port} RTP/AVP 0 101")
        if media_level_c:
            lines.append(f"c=IN IP4 {host}")
        lines += ["a=rtpmap:0 PCMU/8000", "a=rtpmap:101 telephone-event/8000", "a=ptime:20", "a=sendonly",
                  f"a=label:{label}"]
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n").encode()


def metadata(parties: list[tuple[str, str, str, str]], *, session: str = "hVpd7YQgRW2nD22h7q60JQ==") -> bytes:
    """RFC 7865 metadata; ``parties``: (participant id, name, AoR, stream label) each, the
    participant sending on the stream with that label (``participantstreamassoc``); the
    first party is the calling party (Oracle/Acme ``callingParty`` extension)."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<recording xmlns="urn:ietf:params:xml:ns:recording:1">',
           "<datamode>complete</datamode>",
           f'<session session_id="{session}"><sipSessionID>ab30317f1a784dc48ff824d0d3715d86;'
           "remote=47755a9de7794ba387653f2099600ef2</sipSessionID></session>"]
    for i, (pid, name, aor, _label) in enumerate(parties):
        out.append(f'<participant participant_id="{pid}" session_id="{session}">'
                   f'<nameID aor="{aor}"><name xml:lang="en">{name}</name></nameID></participant>')
    for _pid, _name, _aor, label in parties:
        out.append(f'<stream stream_id="S{label}" session_id="{session}"><label>{label}</label></stream>')
    for pid, _name, _aor, label in parties:
        others = "".join(f"<recv>S{other}</recv>" for _p, _n, _a, other in parties if other != label)
        out.append(f'<participantstreamassoc participant_id="{pid}"><send>S{label}</send>{others}'
                   "</participantstreamassoc>")
    out.append("</recording>")
    return "\n".join(out).encode()


def multipart(sdp_body: bytes, xml: bytes, *, metadata_first: bool = False) -> bytes:
    sdp_part = b"Content-Type: application/sdp\r\n\r\n" + sdp_body
    xml_part = (b"Content-Type: application/rs-metadata+xml\r\nContent-Disposition: recording-session\r\n\r\n"
                + xml)
    parts = [xml_part, sdp_part] if metadata_first else [sdp_part, xml_part]
    delimiter = f"--{BOUNDARY}\r\n".encode()
    return delimiter + (b"\r\n" + delimiter).join(parts) + f"\r\n--{BOUNDARY}--\r\n".encode()


CUSTOMER = ("P1", "Alice Customer", "sip:+15551230001@pbx.example.com", "1")
AGENT = ("P2", "Bob Agent", "sip:+15559870002@cc.example.com", "2")


class RecordingClient(Caller):
    """The SRC: a :class:`Caller` whose requests carry ``Require: siprec``, a ``+sip.src``
    Contact and multipart bodies."""

    def __init__(self, peer: SipPeer, *, siprec_headers: bool = True) -> None:
        super().__init__(peer, to_user="recorder", from_user="sbc")
        self.siprec_headers = siprec_headers
        self.content_type = f"multipart/mixed;boundary={BOUNDARY}"

    def request(self, method: str, *, cseq: int, via_branch: str, body: bytes = b"", uri: str | None = None,
                to_tag: str | None = None) -> bytes:
        raw = super().request(method, cseq=cseq, via_branch=via_branch, body=body, uri=uri, to_tag=to_tag)
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        out = []
        for line in lines:
            if line.startswith("Contact:") and self.siprec_headers:
                line += ";+sip.src"
            if line.startswith("Content-Type:"):
                line = f"Content-Type: {self.content_type}"
            out.append(line)
            if line.startswith("CSeq:") and self.siprec_headers and method in ("INVITE", "UPDATE"):
                out.append("Require: siprec")
        return ("\r\n".join(out) + "\r\n\r\n").encode() + rest

    async def update(self, body: bytes, content_type: str) -> SipResponse:
        self.cseq += 1
        saved, self.content_type = self.content_type, content_type
        try:
            self.peer.send(self.request("UPDATE", cseq=self.cseq, via_branch=branch_id(), body=body))
        finally:
            self.content_type = saved
        response = await self.peer.expect(self._is_final(self.cseq, "UPDATE"), "final response to UPDATE")
        assert isinstance(response, SipResponse)
        return response


def branch_id() -> str:
    return "z9hG4bK" + uuid.uuid4().hex[:16]


def answered_streams(body: bytes) -> list[dict[str, Any]]:
    """The m-lines of our answer, read line by line: port, direction, label."""
    streams: list[dict[str, Any]] = []
    for line in body.decode().splitlines():
        if line.startswith("m="):
            kind, port, *_ = line[2:].split()
            streams.append({"kind": kind, "port": int(port), "direction": None, "label": None})
        elif streams and line in ("a=recvonly", "a=inactive", "a=sendonly", "a=sendrecv"):
            streams[-1]["direction"] = line[2:]
        elif streams and line.startswith("a=label:"):
            streams[-1]["label"] = line[len("a=label:"):]
    return streams


# -- RTP from one source port to several of ours ----------------------------------------------------

SILENCE = b"\xff" * 160  # mu-law silence, 20 ms


def packets(payload: bytes, *, ssrc: int, lead_silence_s: float = 0.0, tail_silence_s: float = 1.2) -> list[bytes]:
    frames = [SILENCE] * int(lead_silence_s * 50)
    frames += [payload[i:i + 160].ljust(160, b"\xff") for i in range(0, len(payload), 160)]
    frames += [SILENCE] * int(tail_silence_s * 50)
    return [struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc) + frame
            for seq, frame in enumerate(frames)]


async def play(sock: socket.socket, streams: list[tuple[int, list[bytes]]]) -> None:
    """Every stream's packets, 20 ms apart, all from ``sock`` (one source port)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    longest = max(len(p) for _port, p in streams)
    for i in range(longest):
        for port, stream in streams:
            if i < len(stream):
                sock.sendto(stream[i], ("127.0.0.1", port))
        delay = start + (i + 1) * 0.02 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)


# -- the user agent ---------------------------------------------------------------------------------

PEER = Peer("udp", "127.0.0.1", 5070)


def invite(headers: list[str], body: bytes = b"", content_type: str = "application/sdp") -> bytes:
    lines = ["INVITE sip:recorder@127.0.0.1 SIP/2.0",
             "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-" + uuid.uuid4().hex[:10],
             "Max-Forwards: 70", "From: <sip:sbc@127.0.0.1>;tag=src1", "To: <sip:recorder@127.0.0.1>",
             f"Call-ID: {uuid.uuid4().hex}", "CSeq: 1 INVITE", *headers]
    if body:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def drive(ua: UserAgent, data: bytes) -> tuple[list[Any], list[SipResponse]]:
    ua.receive(data, PEER, 0.0)
    responses = [parse_message(t.data) for t in ua.take_transmits()]
    return ua.take_events(), [r for r in responses if isinstance(r, SipResponse)]


def test_require_siprec_is_taken_and_the_call_is_marked_siprec():
    ua = UserAgent(local_host="127.0.0.1", local_port=5060)
    body = multipart(recording_sdp([("1", 4000), ("2", 4002)]), metadata([CUSTOMER, AGENT]))
    events, responses = drive(ua, invite(["Contact: <sip:sbc@127.0.0.1:5070>;+sip.src", "Require: siprec"],
                                         body, f"multipart/mixed;boundary={BOUNDARY}"))
    assert [r.status for r in responses if r.status >= 200] == []  # no 420: the gateway decides
    [call] = [e for e in events if isinstance(e, IncomingCall)]
    assert call.siprec
    assert sdp.SessionDescription.parse(call.offer).media[1].port == 4002  # the SDP part, as the offer
    assert ua.answer(call.dialog_id, b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", 0.0)
    [ok] = [parse_message(t.data) for t in ua.take_transmits()]
    assert isinstance(ok, SipResponse) and ok.status == 200
    assert (ok.headers.get("contact") or "").endswith(";+sip.srs")


def test_other_option_tags_still_get_420():
    ua = UserAgent(local_host="127.0.0.1", local_port=5060)
    _events, responses = drive(ua, invite(["Contact: <sip:a@127.0.0.1:5070>", "Require: siprec, 100rel"]))
    [refused] = responses
    assert refused.status == 420 and refused.headers.get("unsupported") == "100rel"


@pytest.mark.parametrize(("contact", "require", "expected"), [
    ("<sip:sbc@127.0.0.1:5070>;+sip.src", None, True),  # RFC 7866 6.1.1 feature tag
    ("<sip:sbc@127.0.0.1:5070;src>", None, True),  # BroadWorks: a src URI parameter
    ("<sip:sbc@127.0.0.1:5070>", "siprec", True),
    ("<sip:sbc@127.0.0.1:5070>;+sip.srcx", None, False),
    ("<sip:src@127.0.0.1:5070>", "timer", False),  # "src" as a user name is no marker
])
def test_is_siprec(contact, require, expected):
    headers = [f"Contact: {contact}"] + ([f"Require: {require}"] if require else [])
    request = parse_message(invite(headers))
    assert is_siprec(request) is expected  # type: ignore[arg-type]


def test_has_metadata_finds_the_metadata_part_in_either_order():
    xml = metadata([CUSTOMER])
    ctype = f"multipart/mixed;boundary={BOUNDARY}"
    assert has_metadata(ctype, multipart(recording_sdp([("1", 4000)]), xml))
    assert has_metadata(ctype, multipart(recording_sdp([("1", 4000)]), xml, metadata_first=True))
    assert has_metadata("application/rs-metadata", xml)
    assert not has_metadata("application/sdp", recording_sdp([("1", 4000)]))
    assert not has_metadata(ctype, b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n")


def test_metadata_without_sdp_is_a_siprec_body_only():
    xml = metadata([CUSTOMER])
    ua = UserAgent(local_host="127.0.0.1", local_port=5060)
    _events, responses = drive(ua, invite(["Contact: <sip:a@127.0.0.1:5070>"], xml, "application/rs-metadata+xml"))
    assert [r.status for r in responses] == [415]  # a plain call cannot use it
    events, responses = drive(ua, invite(["Contact: <sip:a@127.0.0.1:5070>;+sip.src"], xml,
                                         "application/rs-metadata+xml"))
    [call] = [e for e in events if isinstance(e, IncomingCall)]
    assert call.siprec and call.offer == b""  # the gateway refuses it (no SDP offer), not the user agent


def test_a_metadata_only_update_reaches_the_gateway_and_gets_a_bodiless_200():
    ua = UserAgent(local_host="127.0.0.1", local_port=5060)
    body = multipart(recording_sdp([("1", 4000)]), metadata([CUSTOMER]))
    first = invite(["Contact: <sip:sbc@127.0.0.1:5070>;+sip.src", "Require: siprec"], body,
                   f"multipart/mixed;boundary={BOUNDARY}")
    events, _ = drive(ua, first)
    [call] = [e for e in events if isinstance(e, IncomingCall)]
    ua.answer(call.dialog_id, b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", 0.0)
    ok = parse_message(ua.take_transmits()[0].data)
    assert isinstance(ok, SipResponse)
    to = ok.headers.get("to")
    call_id = parse_message(first).headers.get("call-id")  # type: ignore[union-attr]
    ack = (f"ACK sip:earshot@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-ack1\r\n"
           f"From: <sip:sbc@127.0.0.1>;tag=src1\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\n"
           "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()
    drive(ua, ack)
    xml = metadata([CUSTOMER, AGENT])
    update = (f"UPDATE sip:earshot@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-up1\r\n"
              f"From: <sip:sbc@127.0.0.1>;tag=src1\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: 2 UPDATE\r\n"
              "Max-Forwards: 70\r\nContact: <sip:sbc@127.0.0.1:5070>;+sip.src\r\n"
              f"Content-Type: application/rs-metadata+xml\r\nContent-Length: {len(xml)}\r\n\r\n").encode() + xml
    events, responses = drive(ua, update)
    assert responses == []  # not answered as a session refresh: the gateway reads the metadata
    [reinvite] = [e for e in events if isinstance(e, ReInvite)]
    assert reinvite.offer == b"" and reinvite.request.method == "UPDATE"
    assert ua.accept_reinvite(call.dialog_id, b"", 0.1)
    [done] = [parse_message(t.data) for t in ua.take_transmits()]
    assert isinstance(done, SipResponse) and done.status == 200 and done.body == b""


# -- SDP ------------------------------------------------------------------------------------------------

def test_each_sendonly_stream_is_answered_recvonly_on_its_own_port_with_its_label():
    offer = sdp.SessionDescription.parse(
        recording_sdp([("1", 4000), ("2", 4002)], host="192.0.2.10")
        + b"m=video 4004 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=sendonly\r\n")
    streams = sdp.recorded_streams(offer)
    assert [(s.label, s.remote_host, s.remote_port, s.codec, s.dtmf_payload_type, s.paused) for s in streams] == [
        ("1", "192.0.2.10", 4000, "PCMU", 101, False), ("2", "192.0.2.10", 4002, "PCMU", 101, False)]
    answer = sdp.answer_recording(offer, streams, {0: 30000, 1: 30002}, local_host="127.0.0.1", session_id=7,
                                  session_version=1)
    assert answered_streams(answer.to_bytes()) == [
        {"kind": "audio", "port": 30000, "direction": "recvonly", "label": "1"},
        {"kind": "audio", "port": 30002, "direction": "recvonly", "label": "2"},
        {"kind": "video", "port": 0, "direction": None, "label": None},
    ]


def test_session_level_connection_repeated_or_missing_labels_and_paused_streams():
    body = recording_sdp([("1", 4000), ("1", 4002)], media_level_c=False).replace(
        b"a=label:1\r\nm=", b"m=", 1).replace(b"a=sendonly\r\na=label:1", b"a=inactive\r\na=label:1", 1)
    streams = sdp.recorded_streams(sdp.SessionDescription.parse(body))
    assert [(s.label, s.remote_host, s.paused) for s in streams] == [("stream1", "127.0.0.1", False),
                                                                    ("1", "127.0.0.1", True)]


def test_an_offer_without_g711_records_nothing():
    body = recording_sdp([("1", 4000)]).replace(b"RTP/AVP 0 101", b"RTP/AVP 18").replace(
        b"a=rtpmap:0 PCMU/8000", b"a=rtpmap:18 G729/8000")
    with pytest.raises(sdp.NoAcceptableCodec):
        sdp.recorded_streams(sdp.SessionDescription.parse(body))


# -- events -----------------------------------------------------------------------------------------------

def test_participants_and_leg_identity_fields_round_trip():
    factory = EventFactory(CallInfo(call_id="c1", source=Source("siprec", (("call_id", "x"), ("transport", "udp")))))
    started = factory.make(CALL_STARTED, {"legs": ["caller", "agent"], "participants": [
        {"leg": "caller", "role": "customer", "name": "Alice", "number": "+15551230001", "aor": "sip:a@b"},
        {"role": "unknown"}]})
    wire = started.to_dict()
    assert wire["participants"][0] == {"leg": "caller", "role": "customer", "name": "Alice",
                                       "number": "+15551230001", "aor": "sip:a@b"}
    assert Event.from_wire(wire).data["participants"] == wire["participants"]
    final = factory.make("turn.final", {"turn": 1, "start_ms": 0, "end_ms": 10, "text": "hi", "role": "agent",
                                        "participant": "Bob", "number": "2001"}, leg="agent")
    assert {k: final.to_dict()[k] for k in ("role", "participant", "number")} == {
        "role": "agent", "participant": "Bob", "number": "2001"}
    with pytest.raises(EventError, match=r"participants\[0\]\.colour: unknown field"):
        factory.make(CALL_STARTED, {"participants": [{"colour": "red"}]})


# -- leg mapping ---------------------------------------------------------------------------------------------

def test_legs_are_named_by_role_then_label():
    from gateway.srs import leg_name

    def stream(label: str, index: int = 0) -> sdp.RecordedStream:
        return sdp.RecordedStream(index, label, 0, "PCMU", None, "127.0.0.1", 4000, "sendonly", 20)

    taken: set[str] = set()
    assert leg_name(stream("1"), "customer", taken) == "caller"
    assert leg_name(stream("2"), "agent", {"caller"}) == "agent"
    assert leg_name(stream("3"), "agent", {"caller", "agent"}) == "3"  # a second agent: its label
    assert leg_name(stream("agent"), "unknown", set()) == "label-agent"  # a label never poses as a role
    assert leg_name(stream("a b/c"), "unknown", {"a-b-c"}) == "a-b-c-2"


# -- through the gateway ----------------------------------------------------------------------------------------

MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def recorder(prefix: str) -> AsyncIterator[MakeGateway]:
    """A gateway with the stub transcriber (placeholder words for every turn the VAD finds)."""
    gateways: list[Gateway] = []

    async def make(*, pairs: int = 6, **overrides: Any) -> Gateway:
        rtp_min, rtp_max = free_rtp_range(pairs)
        settings = load_settings(environ={
            "EARSHOT_SIP_HOST": "127.0.0.1", "EARSHOT_SIP_TCP": "false", "EARSHOT_HTTP_HOST": "127.0.0.1",
            "EARSHOT_HTTP_PORT": "0", "EARSHOT_RTP_HOST": "127.0.0.1", "EARSHOT_RTP_PORT_MIN": str(rtp_min),
            "EARSHOT_RTP_PORT_MAX": str(rtp_max), "EARSHOT_REDIS_URL": REDIS_URL, "EARSHOT_STREAM_PREFIX": prefix,
            "EARSHOT_PERSIST": "false", "EARSHOT_WEB_ENABLED": "false", "EARSHOT_MEDIA_TIMEOUT_S": "60",
        })
        settings = dataclasses.replace(settings, sip_port=0, **overrides)
        gateway = Gateway(settings, transcriber=StubTranscriber(), dialplan=Dialplan.accept_all())
        gateways.append(gateway)
        await gateway.start()
        return gateway

    try:
        yield make
    finally:
        for gateway in gateways:
            await gateway.close()


@pytest.fixture
async def src_peer() -> AsyncIterator[Callable[[Gateway], Awaitable[SipPeer]]]:
    peers: list[SipPeer] = []

    async def open_(gateway: Gateway) -> SipPeer:
        peer = await SipPeer.open(gateway.sip_port)
        peers.append(peer)
        return peer

    try:
        yield open_
    finally:
        for peer in peers:
            peer.close()


@pytest.fixture
def rtp_source() -> Any:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def finals_by_leg(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event["type"] == "turn.final":
            out.setdefault(event["leg"], []).append(event)
    return out


async def test_a_two_party_recording_becomes_two_legs_with_roles_names_and_numbers(recorder, src_peer, rtp_source):
    gateway = await recorder()
    src = RecordingClient(await src_peer(gateway))
    media_port = rtp_source.getsockname()[1]
    body = multipart(recording_sdp([("1", media_port), ("2", media_port)]), metadata([CUSTOMER, AGENT]),
                     metadata_first=True)  # BroadWorks order
    response = await src.invite(body)
    assert response.status == 200, (response.status, response.reason)
    streams = answered_streams(response.body)
    assert [(s["direction"], s["label"]) for s in streams] == [("recvonly", "1"), ("recvonly", "2")]
    assert streams[0]["port"] != streams[1]["port"]
    [call] = gateway.calls.values()
    assert call.siprec and len(call.sockets()) == 2
    customer, _ = read_g711(CUSTOMER_FIXTURE)
    agent, _ = read_g711(AGENT_FIXTURE)
    # the customer speaks, then the agent answers: both streams flow all along, from one source port
    await play(rtp_source, [(streams[0]["port"], packets(customer, ssrc=0x1111, tail_silence_s=3.6)),
                            (streams[1]["port"], packets(agent, ssrc=0x2222, lead_silence_s=3.0))])
    await wait_until(lambda: all(p.turns_published for p in call.session.legs.values()),
                     "a final on each leg", timeout=30)
    assert (await src.bye()).status == 200
    await wait_until(lambda: not gateway.calls, "the call to end", timeout=30)
    events = await published_events(gateway)
    started = events[0]
    assert started["type"] == "call.started" and started["source"]["kind"] == "siprec"
    assert started["legs"] == ["caller", "agent"]
    assert started["participants"] == [
        {"leg": "caller", "role": "customer", "name": "Alice Customer", "number": "+15551230001",
         "aor": "sip:+15551230001@pbx.example.com"},
        {"leg": "agent", "role": "agent", "name": "Bob Agent", "number": "+15559870002",
         "aor": "sip:+15559870002@cc.example.com"}]
    finals = finals_by_leg(events)
    assert set(finals) == {"caller", "agent"}
    for leg, (role, name, number) in {"caller": ("customer", "Alice Customer", "+15551230001"),
                                      "agent": ("agent", "Bob Agent", "+15559870002")}.items():
        assert all((f["role"], f["participant"], f["number"]) == (role, name, number) for f in finals[leg]), finals
    # the agent's reply starts after the customer's turn, on the call's one timeline
    assert finals["caller"][0]["start_ms"] < finals["agent"][0]["start_ms"]
    assert events[-1]["type"] == "call.ended" and events[-1]["rtp"]["packets"] >= 2 * 50 * 4
    assert gateway.ports.available == gateway.ports.capacity  # both ports back


async def test_require_siprec_without_metadata_is_a_400_with_a_reason(recorder, src_peer):
    gateway = await recorder()
    src = RecordingClient(await src_peer(gateway))
    src.content_type = "application/sdp"
    response = await src.invite(recording_sdp([("1", 4000), ("2", 4002)]))
    assert response.status == 400
    assert "metadata" in response.reason.lower(), response.reason
    assert gateway.calls == {} and gateway.ports.available == gateway.ports.capacity


async def test_malformed_metadata_is_a_400(recorder, src_peer):
    gateway = await recorder()
    src = RecordingClient(await src_peer(gateway))
    response = await src.invite(multipart(recording_sdp([("1", 4000)]), b"<recording><participant"))
    assert response.status == 400 and response.reason.startswith("Bad Request - "), response.reason


async def test_a_plain_call_still_has_one_leg(recorder, src_peer):
    gateway = await recorder()
    caller = Caller(await src_peer(gateway))
    response = await caller.invite(recording_sdp([("1", 4000)]).replace(b"a=sendonly", b"a=sendrecv"))
    assert response.status == 200
    [call] = gateway.calls.values()
    assert not call.siprec and call.recorded == [] and list(call.session.legs) == ["caller"]
    assert call.session.source.kind == "sip"
    assert (await caller.bye()).status == 200


async def test_a_re_invite_adds_the_second_party_mid_call_and_an_update_renames_it(recorder, src_peer, rtp_source):
    """Avaya SBCE: the customer's stream first; the agent's stream and participant come in a
    re-INVITE; a metadata-only UPDATE later changes the agent's name."""
    gateway = await recorder()
    src = RecordingClient(await src_peer(gateway))
    media_port = rtp_source.getsockname()[1]
    response = await src.invite(multipart(recording_sdp([("1", media_port)]), metadata([CUSTOMER])))
    assert response.status == 200
    [first] = answered_streams(response.body)
    [call] = gateway.calls.values()
    assert list(call.session.legs) == ["caller"]
    response = await src.invite(multipart(recording_sdp([("1", media_port), ("2", media_port)], version=2),
                                          metadata([CUSTOMER, AGENT])))
    assert response.status == 200
    again, second = answered_streams(response.body)
    assert again["port"] == first["port"] and second["port"] not in (0, first["port"])
    assert (second["direction"], second["label"]) == ("recvonly", "2")
    await wait_until(lambda: "agent" in call.session.legs, "the agent's leg")
    assert call.session.legs["agent"].identity == {"role": "agent", "participant": "Bob Agent",
                                                   "number": "+15559870002"}
    renamed = ("P2", "Carol Agent", "sip:+15559870002@cc.example.com", "2")
    response = await src.update(metadata([CUSTOMER, renamed]), "application/rs-metadata+xml")
    assert response.status == 200 and response.body == b""
    assert call.session.legs["agent"].identity["participant"] == "Carol Agent"
    agent, _ = read_g711(AGENT_FIXTURE)
    await play(rtp_source, [(second["port"], packets(agent, ssrc=0x3333))])
    await wait_until(lambda: call.session.legs["agent"].turns_published > 0, "the agent's final", timeout=30)
    assert (await src.bye()).status == 200
    await wait_until(lambda: not gateway.calls, "the call to end", timeout=30)
    finals = finals_by_leg(await published_events(gateway))
    assert [(f["role"], f["participant"]) for f in finals["agent"]] == [("agent", "Carol Agent")] * len(
        finals["agent"])
    assert "caller" not in finals  # nothing was said on the customer's stream


# -- the store and the dashboard: a two-speaker transcript ---------------------------------------------------

def siprec_call_events(words: tuple[str, str]) -> list[Event]:
    """A SIPREC call as the gateway publishes it: the customer's turn, the agent's, the end."""
    info = CallInfo(call_id=str(uuid.uuid4()), sip_call_id=uuid.uuid4().hex, from_uri="sip:sbc@10.0.0.1",
                    to_uri="sip:recorder@10.0.0.2", started_at=1_767_000_000.0,
                    source=Source("siprec", (("call_id", "x"), ("transport", "udp"))))
    factory = EventFactory(info)
    customer = {"role": "customer", "participant": "Alice Customer", "number": "+15551230001"}
    agent = {"role": "agent", "participant": "Bob Agent", "number": "+15559870002"}
    return [
        factory.make(CALL_STARTED, {"codec": "PCMU", "legs": ["caller", "agent"], "participants": [
            {"leg": "caller", **{"role": "customer", "name": "Alice Customer", "number": "+15551230001"}},
            {"leg": "agent", **{"role": "agent", "name": "Bob Agent", "number": "+15559870002"}}]}),
        factory.make("turn.final", {"turn": 1, "start_ms": 300, "end_ms": 2100,
                                    "text": f"my order {words[0]} never arrived", **customer}, leg="caller"),
        factory.make("turn.final", {"turn": 1, "start_ms": 2600, "end_ms": 4200,
                                    "text": f"let me check {words[1]} for you", **agent}, leg="agent"),
        factory.make("call.ended", {"reason": "bye", "duration_ms": 5000, "turns": 2}),
    ]


@pytest.fixture
def siprec_store(tmp_path):
    from gateway.persister import parse_entry, store_events
    from gateway.store import migrate
    from gateway.store.db import make_engine, make_sessionmaker

    url = f"sqlite:///{tmp_path / 'earshot.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    words = ("zqcust" + uuid.uuid4().hex[:6], "zqagent" + uuid.uuid4().hex[:6])
    events = siprec_call_events(words)
    with make_sessionmaker(engine)() as s:
        store_events(s, [parse_entry(f"{i + 1}-0", e.to_fields()) for i, e in enumerate(events)])
        s.commit()
    yield {"url": url, "engine": engine, "words": words, "call_id": events[0].call_id}
    engine.dispose()


def test_the_store_keeps_who_speaks_on_each_leg_and_search_finds_either_side(siprec_store):
    from gateway.store.db import make_sessionmaker
    from gateway.store.queries import get_call
    from gateway.store.search import search_calls, search_turns

    with make_sessionmaker(siprec_store["engine"])() as s:
        detail = get_call(s, siprec_store["call_id"])
        assert detail is not None and detail.legs == ["agent", "caller"]
        assert {leg: (row.role, row.participant, row.number) for leg, row in detail.speakers.items()} == {
            "caller": ("customer", "Alice Customer", "+15551230001"),
            "agent": ("agent", "Bob Agent", "+15559870002")}
        assert [(t.leg, t.start_ms) for t in detail.turns] == [("caller", 300), ("agent", 2600)]  # by time
        assert (detail.side("caller"), detail.side("agent")) == ("customer", "agent")
        for word, leg in zip(siprec_store["words"], ("caller", "agent")):
            assert [c.call_id for c in search_calls(s, word).items] == [siprec_store["call_id"]]
            assert [t.leg for t in search_turns(s, word).items] == [leg]


def test_the_call_page_shows_a_two_speaker_transcript(siprec_store, tmp_path):
    from fastapi.testclient import TestClient

    from gateway.config import Settings
    from gateway.store.db import make_sessionmaker
    from gateway.store.users import create_user
    from gateway.web import Dashboard
    from tests.unit.test_web_app import login

    with make_sessionmaker(siprec_store["engine"])() as s:
        create_user(s, "alice", "correct horse battery", "supervisor")
        s.commit()
    settings = Settings(database_url=siprec_store["url"], stream_prefix="earshot-siprec-unused",
                        web_secret_file=str(tmp_path / "secret"))
    with TestClient(Dashboard(settings, engine=siprec_store["engine"]).asgi) as client:
        login(client)
        html = client.get(f"/calls/{siprec_store['call_id']}").text
    assert 'class="timeline two-sided"' in html
    caller = html.index('data-key="caller:1"')
    agent = html.index('data-key="agent:1"')
    assert caller < agent  # in time order across the legs
    assert "side-customer" in html[html.rindex("<li", 0, caller):caller]
    assert "side-agent" in html[html.rindex("<li", 0, agent):agent]
    assert 'Alice Customer <span class="role">customer</span>' in html
    assert 'Bob Agent <span class="role">agent</span>' in html
    parties = html[html.index('id="call-parties"'):]
    parties = parties[:parties.index("</p>")]
    assert "Alice Customer <code>+15551230001</code>" in parties and "Bob Agent <code>+15559870002</code>" in parties


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="chromium is not installed")
def test_the_live_view_colours_each_side_and_names_the_speaker(tmp_path):
    """earshot.js's transcript view in a real browser (headless Chromium), fed the events the
    live call view receives: the customer's final, then the agent's, then a late customer one."""
    import json
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "gateway/web/static/earshot.js"
    events = [
        {"leg": "caller", "turn": 1, "start_ms": 300, "text": "my order never arrived", "role": "customer",
         "participant": "Alice Customer", "number": "+15551230001"},
        {"leg": "agent", "turn": 1, "start_ms": 2600, "text": "let me check", "role": "agent",
         "participant": "Bob Agent", "number": "+15559870002"},
        {"leg": "caller", "turn": 2, "start_ms": 1500, "text": "it was a gift", "role": "customer",
         "participant": "Alice Customer"},
    ]
    page = tmp_path / "live.html"
    page.write_text(
        f'<html><body><ol id="timeline"></ol><script src="{script.as_uri()}"></script><script>'
        f'var view = transcriptView(document.getElementById("timeline"));'
        f'{json.dumps(events)}.forEach(function (ev) {{ view.turn(ev, true); }});'
        "</script></body></html>")
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    dom = done.stdout
    assert 'class="timeline two-sided"' in dom or 'id="timeline" class="two-sided"' in dom, dom[-2000:]
    keys = [dom.index(f'data-key="{k}"') for k in ("caller:1", "caller:2", "agent:1")]
    assert keys == sorted(keys), dom  # by start time across the legs
    for key, side, name in (("caller:1", "customer", "Alice Customer"), ("agent:1", "agent", "Bob Agent")):
        at = dom.index(f'data-key="{key}"')
        item = dom[dom.rindex("<li", 0, at):dom.index("</li>", at)]
        assert f"side-{side}" in item and name in item and f'<span class="role">{side}</span>' in item, item


def test_any_offer_records_or_raises_sdp_error_and_the_answer_is_clean():
    """Hypothesis, over the SDP offers of test_fuzz_properties with labels and more m-lines:
    recorded_streams and answer_recording raise nothing but SdpError, and the answer parses
    back to itself with one recvonly/inactive line per recorded stream."""
    from hypothesis import given
    from hypothesis import strategies as st

    from tests.unit.test_fuzz_properties import QUICK, sdp_offers

    extra = st.lists(st.sampled_from(["m=audio 4000 RTP/AVP 0", "m=audio 4002 RTP/AVP 8 101", "a=label:1",
                                      "a=label:2", "a=label:", "a=label:\u00e9t\u00e9 x", "c=IN IP4 10.0.0.1",
                                      "a=sendonly", "a=inactive", "m=audio 0 RTP/AVP 0", "m=video 4004 RTP/AVP 96"]),
                     max_size=10)

    @QUICK
    @given(sdp_offers(), extra)
    def check(data: bytes, more: list[str]) -> None:
        try:
            offer = sdp.parse_sdp(data + ("\r\n".join(more) + "\r\n").encode() if more else data)
            streams = sdp.recorded_streams(offer)
        except sdp.SdpError as exc:
            assert exc.reason
            return
        assert len({s.label for s in streams}) == len(streams)
        ports = {s.index: 30000 + 2 * i for i, s in enumerate(streams)}
        answer = sdp.answer_recording(offer, streams, ports, local_host="127.0.0.1", session_id=1,
                                      session_version=1).to_bytes()
        assert b"\r\n\r\n" not in answer and sdp.parse_sdp(answer).to_bytes() == answer
        answered = [s for s in answered_streams(answer) if s["port"]]
        assert len(answered) == len(streams)
        assert all(s["direction"] in ("recvonly", "inactive") for s in answered)

    check()


async def test_a_metadata_only_re_invite_and_a_paused_recording(recorder, src_peer, rtp_source):
    """A re-INVITE with metadata and no SDP gets our streams as they stand as its offer (RFC 3261
    14.2); an SRC pausing both streams (a=inactive, RFC 7866 9.2) puts the call on hold."""
    gateway = await recorder()
    src = RecordingClient(await src_peer(gateway))
    media_port = rtp_source.getsockname()[1]
    response = await src.invite(multipart(recording_sdp([("1", media_port), ("2", media_port)]),
                                          metadata([CUSTOMER, AGENT])))
    assert response.status == 200
    ports = [s["port"] for s in answered_streams(response.body)]
    [call] = gateway.calls.values()
    src.content_type = "application/rs-metadata+xml"
    renamed = ("P1", "Alice B. Customer", "sip:+15551230001@pbx.example.com", "1")
    response = await src.invite(metadata([renamed, AGENT]))
    assert response.status == 200
    assert [s["port"] for s in answered_streams(response.body)] == ports  # our streams, offered again
    assert sdp.SessionDescription.parse(response.body).origin.session_version == "2"
    assert call.session.legs["caller"].identity["participant"] == "Alice B. Customer"
    assert not call.on_hold
    src.content_type = f"multipart/mixed;boundary={BOUNDARY}"
    paused = recording_sdp([("1", media_port), ("2", media_port)], version=3).replace(b"a=sendonly", b"a=inactive")
    response = await src.invite(multipart(paused, metadata([renamed, AGENT])))
    assert response.status == 200
    assert [(s["port"], s["direction"]) for s in answered_streams(response.body)] == [
        (ports[0], "inactive"), (ports[1], "inactive")]
    assert call.on_hold
    response = await src.invite(multipart(recording_sdp([("1", media_port), ("2", media_port)], version=4),
                                          metadata([renamed, AGENT])))
    assert [s["direction"] for s in answered_streams(response.body)] == ["recvonly", "recvonly"]
    assert not call.on_hold and gateway.calls
    assert (await src.bye()).status == 200
