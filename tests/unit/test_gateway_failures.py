"""The gateway's failure paths, through a real Gateway built in this process.

Each test builds :class:`gateway.app.Gateway` with real sockets (SIP on UDP
127.0.0.1, an RTP port range, HTTP, the machine's Redis) and plays the SIP
peer from a UDP socket of its own: the requests are written out by hand from
RFC 3261 (8.1.1, 13.2.2.4, 17.1.1.3) and the gateway's answers are read with
:func:`gateway.sip.message.parse_message`. The assertions are on what went
over the wire (status, reason phrase, headers, SDP) and on the gateway's own
state (``gateway.calls``, its port allocator, its publisher, Redis), never on
what the test itself sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.app import Gateway
from gateway.asr.media_only import MediaOnlyTranscriber
from gateway.config import load_settings
from gateway.dialplan import Dialplan, load_dialplan
from gateway.events import parse_fields
from gateway.rtp.transport import RtpPortAllocator
from gateway.sip.message import NameAddress, SipRequest, SipResponse, parse_cseq, parse_message
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
WAIT = 10.0  # generous bound for anything to happen on loopback
RETRY_AFTER = 7  # not the default (30): the header must carry the configured value
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


# -- SDP written by hand ----------------------------------------------------------------

def offer(*, formats: str = "0 101", rtpmap: tuple[str, ...] = ("0 PCMU/8000", "101 telephone-event/8000"),
          direction: str | None = None, version: int = 1, media: str = "audio", port: int = 40000) -> bytes:
    lines = ["v=0", f"o=pbx 4242 {version} IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0",
             f"m={media} {port} RTP/AVP {formats}"]
    lines += [f"a=rtpmap:{value}" for value in rtpmap]
    if direction:
        lines.append(f"a={direction}")
    return ("\r\n".join(lines) + "\r\n").encode()


G711 = offer()
G729_ONLY = offer(formats="18", rtpmap=("18 G729/8000",))
VIDEO_ONLY = offer(media="video", formats="96", rtpmap=("96 H264/90000",))


def audio_stream(body: bytes) -> tuple[int, str]:
    """(port, direction) of the first audio stream of an SDP body, read line by line."""
    session_direction = None
    media_direction = None
    port: int | None = None
    in_audio = False
    for line in body.decode().splitlines():
        if line.startswith("m="):
            if port is not None:
                break
            kind, port_text, *_ = line[2:].split()
            in_audio = kind == "audio"
            if in_audio:
                port = int(port_text)
        elif line.startswith("a=") and line[2:] in DIRECTIONS:
            if in_audio:
                media_direction = line[2:]
            elif port is None:
                session_direction = line[2:]
    assert port is not None, f"no audio stream in {body!r}"
    return port, media_direction or session_direction or "sendrecv"


def origin_version(body: bytes) -> int:
    line = next(line for line in body.decode().splitlines() if line.startswith("o="))
    return int(line[2:].split()[2])


# -- the SIP peer -------------------------------------------------------------------------

class SipPeer(asyncio.DatagramProtocol):
    """The far end: one UDP socket on 127.0.0.1 that keeps every datagram it receives."""

    def __init__(self, gateway_port: int) -> None:
        self.gateway_port = gateway_port
        self.transport: asyncio.DatagramTransport | None = None
        self.raw: list[bytes] = []
        self._taken: set[int] = set()
        self._arrived = asyncio.Event()

    @classmethod
    async def open(cls, gateway_port: int) -> SipPeer:
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_datagram_endpoint(lambda: cls(gateway_port), local_addr=("127.0.0.1", 0))
        return peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.raw.append(data)
        self._arrived.set()

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, ("127.0.0.1", self.gateway_port))

    async def expect(self, predicate: Callable[[SipRequest | SipResponse], bool], what: str,
                     timeout: float = WAIT) -> SipRequest | SipResponse:
        """The first message not yet taken that satisfies ``predicate`` (waits up to ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for index, data in enumerate(self.raw):
                if index in self._taken:
                    continue
                message = parse_message(data)
                if predicate(message):
                    self._taken.add(index)
                    return message
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = [data.split(b"\r\n", 1)[0].decode(errors="replace") for data in self.raw]
                raise AssertionError(f"no {what} within {timeout} s; received: {seen}")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def branch() -> str:
    return "z9hG4bK" + uuid.uuid4().hex[:16]


class Caller:
    """One call from the peer's side. Requests are written by hand; the dialog state
    (the gateway's To tag, its Contact as remote target, our CSeq) is kept here."""

    def __init__(self, peer: SipPeer, *, to_user: str = "1000", from_user: str = "pbx") -> None:
        self.peer = peer
        self.to_user = to_user
        self.from_user = from_user
        self.call_id = f"{uuid.uuid4().hex}@127.0.0.1"
        self.from_tag = uuid.uuid4().hex[:10]
        self.to_tag: str | None = None  # the gateway's tag, once a 2xx established the dialog
        self.request_uri = f"sip:{to_user}@127.0.0.1:{peer.gateway_port}"
        self.remote_target = self.request_uri
        self.cseq = 0

    def request(self, method: str, *, cseq: int, via_branch: str, body: bytes = b"", uri: str | None = None,
                to_tag: str | None = None) -> bytes:
        to_tag = to_tag if to_tag is not None else self.to_tag
        to = f"<sip:{self.to_user}@127.0.0.1:{self.peer.gateway_port}>" + (f";tag={to_tag}" if to_tag else "")
        lines = [
            f"{method} {uri or self.remote_target} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.peer.port};branch={via_branch};rport",
            "Max-Forwards: 70",
            f'From: "Test PBX" <sip:{self.from_user}@127.0.0.1>;tag={self.from_tag}',
            f"To: {to}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:{self.from_user}@127.0.0.1:{self.peer.port}>",
            "User-Agent: earshot-failure-tests",
        ]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def _is_final(self, cseq: int, method: str) -> Callable[[SipRequest | SipResponse], bool]:
        def match(message: SipRequest | SipResponse) -> bool:
            return (isinstance(message, SipResponse) and message.status >= 200
                    and message.headers.get("call-id") == self.call_id
                    and parse_cseq(message.headers.get("cseq") or "") == (cseq, method))
        return match

    async def invite(self, body: bytes) -> SipResponse:
        """Send an INVITE (a re-INVITE once the dialog exists) and ACK its final response,
        which is returned: a 2xx with a new transaction (RFC 3261 13.2.2.4), a non-2xx
        on the INVITE's own branch (17.1.1.3)."""
        self.cseq += 1
        cseq, via_branch = self.cseq, branch()
        in_dialog = self.to_tag is not None
        uri = self.remote_target
        self.peer.send(self.request("INVITE", cseq=cseq, via_branch=via_branch, body=body, uri=uri))
        response = await self.peer.expect(self._is_final(cseq, "INVITE"), f"final response to INVITE {cseq}")
        assert isinstance(response, SipResponse)
        tag = NameAddress.parse(response.headers.get("to") or "", "To").tag
        if 200 <= response.status < 300:
            if not in_dialog:
                self.to_tag = tag
            contact = response.headers.get("contact")
            assert contact, response
            self.remote_target = NameAddress.parse(contact, "Contact").uri
            self.peer.send(self.request("ACK", cseq=cseq, via_branch=branch()))
        else:
            self.peer.send(self.request("ACK", cseq=cseq, via_branch=via_branch, uri=uri, to_tag=tag))
        return response

    async def bye(self) -> SipResponse:
        self.cseq += 1
        self.peer.send(self.request("BYE", cseq=self.cseq, via_branch=branch()))
        response = await self.peer.expect(self._is_final(self.cseq, "BYE"), "final response to our BYE")
        assert isinstance(response, SipResponse)
        return response

    async def expect_request(self, method: str, timeout: float = WAIT) -> SipRequest:
        def match(message: SipRequest | SipResponse) -> bool:
            return (isinstance(message, SipRequest) and message.method == method
                    and message.headers.get("call-id") == self.call_id)
        request = await self.peer.expect(match, f"{method} from the gateway", timeout)
        assert isinstance(request, SipRequest)
        return request

    def respond(self, request: SipRequest, status: int, reason: str) -> None:
        """A response built per RFC 3261 8.2.6.2: Via, From, To, Call-ID and CSeq copied."""
        h = request.headers
        lines = [f"SIP/2.0 {status} {reason}"]
        lines += [f"Via: {via}" for via in h.raw("via")]
        lines += [f"From: {h.get('from')}", f"To: {h.get('to')}", f"Call-ID: {h.get('call-id')}",
                  f"CSeq: {h.get('cseq')}", "Content-Length: 0"]
        self.peer.send(("\r\n".join(lines) + "\r\n\r\n").encode())


# -- helpers --------------------------------------------------------------------------------

def _udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_rtp_range(pairs: int) -> tuple[int, int]:
    """``rtp_port_min``/``rtp_port_max`` for ``pairs`` RTP/RTCP pairs that are free now, above the
    kernel's ephemeral range (32768-60999) and the e2e gateways' RTP ranges (20000-39999).

    The range ends one port past the last RTCP port: the settings refuse ``P..P+1``
    (see test_one_pair_rtp_range_is_accepted); the allocator never hands out the last port."""
    while True:
        start = random.randrange(61000, 65500 - 2 * pairs, 2)
        if all(_udp_free(port) for port in range(start, start + 2 * pairs)):
            return start, start + 2 * pairs


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def healthz(gateway: Gateway) -> tuple[int, dict[str, Any]]:
    assert gateway.http is not None
    return await asyncio.to_thread(get_json, f"http://127.0.0.1:{gateway.http.port}/healthz")


async def published_events(gateway: Gateway) -> list[dict[str, Any]]:
    """Everything the gateway published so far, read back from Redis."""
    assert await gateway.publisher.flush(WAIT), "the publisher did not reach Redis"
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        return [parse_fields(fields) for _id, fields in await client.xrange(gateway.settings.events_stream)]
    finally:
        await client.aclose()


def assert_left_no_trace(gateway: Gateway) -> None:
    """A refused call holds no call, no RTP port, and published nothing."""
    assert gateway.calls == {}
    assert gateway.ports.available == gateway.ports.capacity
    assert gateway.publisher.published == 0 and gateway.publisher.backlog == 0


def assert_rejected(response: SipResponse, caller: Caller, status: int, reason: str) -> None:
    assert (response.status, response.reason) == (status, reason), (response.status, response.reason)
    assert response.headers.get("call-id") == caller.call_id
    assert NameAddress.parse(response.headers.get("from") or "", "From").tag == caller.from_tag
    assert NameAddress.parse(response.headers.get("to") or "", "To").tag  # a final response carries a To tag


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(prefix: str) -> AsyncIterator[MakeGateway]:
    """Builds and starts gateways on free ports; every one is closed after the test."""
    gateways: list[Gateway] = []

    async def make(*, pairs: int = 4, dialplan: Dialplan | None = None, **overrides: Any) -> Gateway:
        rtp_min, rtp_max = free_rtp_range(pairs)
        settings = load_settings(environ={
            "EARSHOT_SIP_HOST": "127.0.0.1",
            "EARSHOT_SIP_TCP": "false",
            "EARSHOT_HTTP_HOST": "127.0.0.1",
            "EARSHOT_HTTP_PORT": "0",
            "EARSHOT_RTP_HOST": "127.0.0.1",
            "EARSHOT_RTP_PORT_MIN": str(rtp_min),
            "EARSHOT_RTP_PORT_MAX": str(rtp_max),
            "EARSHOT_REDIS_URL": REDIS_URL,
            "EARSHOT_STREAM_PREFIX": prefix,
            "EARSHOT_PERSIST": "false",
            "EARSHOT_WEB_ENABLED": "false",
            "EARSHOT_RETRY_AFTER_S": str(RETRY_AFTER),
            "EARSHOT_MEDIA_TIMEOUT_S": "300",  # no test here sends RTP
        })
        # sip_port 0 (any free port) is for tests only: validation refuses it, the gateway learns its port
        settings = dataclasses.replace(settings, sip_port=0, **overrides)
        gateway = Gateway(settings, transcriber=MediaOnlyTranscriber(),
                          dialplan=dialplan if dialplan is not None else Dialplan.accept_all())
        gateways.append(gateway)
        await gateway.start()
        assert gateway.sip_port > 0
        return gateway

    try:
        yield make
    finally:
        for gateway in gateways:
            await gateway.close()


@pytest.fixture
async def open_peer() -> AsyncIterator[Callable[[Gateway], Awaitable[SipPeer]]]:
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


# -- the initial INVITE ---------------------------------------------------------------------

@pytest.mark.parametrize(("body", "reason"), [
    (G729_ONLY, "Not Acceptable Here - No acceptable audio codec offered (we take PCMU, PCMA)"),
    (VIDEO_ONLY, "Not Acceptable Here - No audio stream offered"),
], ids=["g729-only", "video-only"])
async def test_invite_without_g711_gets_488_naming_the_problem(make_gateway, open_peer, body, reason):
    gateway = await make_gateway()
    caller = Caller(await open_peer(gateway))
    response = await caller.invite(body)
    assert_rejected(response, caller, 488, reason)
    assert not response.body
    assert_left_no_trace(gateway)


@pytest.mark.parametrize(("body", "reason"), [
    (b"v=0\r\no=pbx 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio forty RTP/AVP 0\r\n",
     "Bad Request - Malformed SDP: Malformed m= port: 'forty'"),
    (b"v=0\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n",
     "Bad Request - Malformed SDP: Missing o= line"),
], ids=["bad-port", "no-origin"])
async def test_invite_with_malformed_sdp_gets_400_saying_so(make_gateway, open_peer, body, reason):
    gateway = await make_gateway()
    caller = Caller(await open_peer(gateway))
    response = await caller.invite(body)
    assert_rejected(response, caller, 400, reason)
    assert_left_no_trace(gateway)


DIALPLAN = """\
version: 1
rules:
  - name: no-premium
    match:
      to: "^sip:900"
    action: reject
    status: 603
    reason: Premium numbers are not transcribed
  - name: support
    match:
      to: "^sip:1000@"
    tags: [support]
"""


async def test_dialplan_reject_sends_the_rules_status_and_reason(make_gateway, open_peer, tmp_path):
    path = tmp_path / "dialplan.yaml"
    path.write_text(DIALPLAN)
    gateway = await make_gateway(dialplan=load_dialplan(path))
    peer = await open_peer(gateway)

    premium = Caller(peer, to_user="900123")
    assert_rejected(await premium.invite(G711), premium, 603, "Premium numbers are not transcribed")
    unmatched = Caller(peer, to_user="555")  # no rule matches: 404, never transcribed by accident
    assert_rejected(await unmatched.invite(G711), unmatched, 404, "Not Found")
    assert_left_no_trace(gateway)

    support = Caller(peer, to_user="1000")  # the same gateway still answers what the plan transcribes
    assert (await support.invite(G711)).status == 200
    await wait_until(lambda: support.to_tag in gateway.calls, "the support call")
    assert (await support.bye()).status == 200
    await wait_until(lambda: not gateway.calls, "the support call to end")
    started = [e for e in await published_events(gateway) if e["type"] == "call.started"]
    assert [(e["sip_call_id"], e["dialplan_rule"], e["tags"]) for e in started] == \
        [(support.call_id, "support", ["support"])]


# gateway.app._party takes the user part as getattr(NameAddress.uri, "user"), but NameAddress.uri
# is the URI's text (a str), so to_user and from_user are always "" for real calls.
# gateway.app._party once never extracted the user part (NameAddress.uri is a str), so the
# to_user/from_user matches of a dialplan never matched a real call; these two tests failed then.

USER_DIALPLAN = """\
version: 1
rules:
  - name: no-premium
    match:
      to_user: "^900"
    action: reject
    status: 603
    reason: Premium numbers are not transcribed
  - name: default
"""


async def test_dialplan_to_user_rule_rejects_with_its_status_and_reason(make_gateway, open_peer, tmp_path):
    path = tmp_path / "dialplan.yaml"
    path.write_text(USER_DIALPLAN)
    gateway = await make_gateway(dialplan=load_dialplan(path))
    caller = Caller(await open_peer(gateway), to_user="900123")
    assert_rejected(await caller.invite(G711), caller, 603, "Premium numbers are not transcribed")
    assert_left_no_trace(gateway)


async def test_bundled_dialplan_rejects_anonymous_callers(make_gateway, open_peer):
    gateway = await make_gateway(dialplan=load_dialplan(ROOT / "dialplans/default.yaml"))
    caller = Caller(await open_peer(gateway), from_user="anonymous")
    assert_rejected(await caller.invite(G711), caller, 403, "Anonymous calls are not transcribed")
    assert_left_no_trace(gateway)


async def test_no_free_rtp_port_gets_503_with_retry_after(make_gateway, open_peer):
    gateway = await make_gateway(pairs=1)  # one RTP/RTCP pair: the first call takes it
    assert gateway.ports.capacity == 1
    peer = await open_peer(gateway)
    first = Caller(peer)
    assert (await first.invite(G711)).status == 200
    await wait_until(lambda: first.to_tag in gateway.calls, "the first call")
    assert gateway.ports.available == 0

    second = Caller(peer)
    refused = await second.invite(G711)
    assert_rejected(refused, second, 503, "Service Unavailable - No RTP Port")
    assert refused.headers.get_all("retry-after") == [str(RETRY_AFTER)]
    assert list(gateway.calls) == [first.to_tag]

    assert (await first.bye()).status == 200  # the port goes back to the allocator
    await wait_until(lambda: gateway.ports.available == 1, "the RTP port to be released")
    third = Caller(peer)
    assert (await third.invite(G711)).status == 200


async def test_rtp_ports_taken_by_another_process_get_503_with_retry_after(make_gateway, open_peer):
    gateway = await make_gateway(pairs=1)
    port = gateway.ports.start + (gateway.ports.start & 1)
    squatters = []
    for p in (port, port + 1):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", p))
        squatters.append(sock)
    try:
        caller = Caller(await open_peer(gateway))
        refused = await caller.invite(G711)
    finally:
        for sock in squatters:
            sock.close()
    assert_rejected(refused, caller, 503, "Service Unavailable - No RTP Port")
    assert refused.headers.get_all("retry-after") == [str(RETRY_AFTER)]
    assert_left_no_trace(gateway)


async def test_call_limit_gets_503_with_retry_after(make_gateway, open_peer):
    gateway = await make_gateway(max_calls=1)
    peer = await open_peer(gateway)
    first = Caller(peer)
    assert (await first.invite(G711)).status == 200
    second = Caller(peer)
    refused = await second.invite(G711)
    assert_rejected(refused, second, 503, "Service Unavailable - Call Limit Reached")
    assert refused.headers.get_all("retry-after") == [str(RETRY_AFTER)]
    assert list(gateway.calls) == [first.to_tag]


# -- re-INVITEs -----------------------------------------------------------------------------

async def test_reinvite_with_unacceptable_offer_gets_488_and_the_call_goes_on(make_gateway, open_peer):
    gateway = await make_gateway()
    caller = Caller(await open_peer(gateway))
    answer = await caller.invite(G711)
    assert answer.status == 200
    await wait_until(lambda: caller.to_tag in gateway.calls and gateway.calls[caller.to_tag].confirmed,
                     "the ACK to reach the gateway")
    call = gateway.calls[caller.to_tag]
    local_port, _ = audio_stream(answer.body)

    refused = await caller.invite(G729_ONLY)
    assert (refused.status, refused.reason) == (488, "Not Acceptable Here")
    assert NameAddress.parse(refused.headers.get("to") or "", "To").tag == caller.to_tag  # in the dialog
    assert gateway.calls.get(caller.to_tag) is call and not call.ending
    assert (call.codec, call.local_port, call.on_hold) == ("PCMU", local_port, False)

    again = await caller.invite(offer(version=3))  # the dialog still takes a good offer
    assert again.status == 200
    assert audio_stream(again.body) == (local_port, "recvonly")
    assert (await caller.bye()).status == 200
    await wait_until(lambda: not gateway.calls, "the call to end")
    ended = [e for e in await published_events(gateway) if e["type"] == "call.ended"]
    assert [e["reason"] for e in ended] == ["bye"]


async def test_hold_and_resume_as_the_gateway_answers_them(make_gateway, open_peer):
    gateway = await make_gateway()
    caller = Caller(await open_peer(gateway))
    answer = await caller.invite(G711)
    assert answer.status == 200
    local_port, direction = audio_stream(answer.body)
    assert direction == "recvonly"  # Earshot only listens
    await wait_until(lambda: caller.to_tag in gateway.calls, "the call")
    call = gateway.calls[caller.to_tag]
    assert call.on_hold is False
    versions = [origin_version(answer.body)]

    # (what the caller offers, the direction the gateway must answer, whether it then holds the call)
    steps = [("sendonly", "recvonly", True), ("sendrecv", "recvonly", False),
             ("inactive", "inactive", True), ("sendrecv", "recvonly", False)]
    for number, (offered, answered, held) in enumerate(steps, start=2):
        response = await caller.invite(offer(direction=offered, version=number))
        assert response.status == 200, (offered, response.status, response.reason)
        assert audio_stream(response.body) == (local_port, answered), (offered, response.body)
        assert gateway.calls[caller.to_tag] is call
        assert call.on_hold is held, offered
        versions.append(origin_version(response.body))
    # RFC 3264 8: each new answer in the session has a higher o= version
    assert versions == sorted(set(versions)), versions
    assert (await caller.bye()).status == 200


# -- drain ----------------------------------------------------------------------------------

async def test_drain_refuses_new_calls_reports_draining_and_ends_the_rest_with_bye(make_gateway, open_peer):
    gateway = await make_gateway()
    peer = await open_peer(gateway)
    active = Caller(peer)
    assert (await active.invite(G711)).status == 200
    await wait_until(lambda: active.to_tag in gateway.calls and gateway.calls[active.to_tag].confirmed,
                     "the ACK to reach the gateway")
    status, body = await healthz(gateway)
    assert (status, body["status"]) == (200, "ok")

    timeout = 3.0
    started = time.monotonic()
    drain = asyncio.create_task(gateway.drain(timeout))
    try:
        await wait_until(lambda: gateway.draining, "the drain to start")

        status, body = await healthz(gateway)
        assert (status, body["status"], body["active_calls"]) == (503, "draining", 1), body
        late = Caller(peer)
        refused = await late.invite(G711)
        assert_rejected(refused, late, 503, "Service Unavailable - Shutting Down")
        assert refused.headers.get_all("retry-after") == [str(RETRY_AFTER)]
        assert not drain.done(), "the drain ended before its timeout with a call still up"

        bye = await active.expect_request("BYE", timeout=timeout + WAIT)
        waited = time.monotonic() - started
        assert timeout <= waited < timeout + WAIT, waited
        assert bye.uri == f"sip:{active.from_user}@127.0.0.1:{peer.port}"  # our Contact
        assert NameAddress.parse(bye.headers.get("from") or "", "From").tag == active.to_tag
        assert NameAddress.parse(bye.headers.get("to") or "", "To").tag == active.from_tag
        assert parse_cseq(bye.headers.get("cseq") or "")[1] == "BYE"
        active.respond(bye, 200, "OK")
        await asyncio.wait_for(drain, WAIT)
    finally:
        if not drain.done():
            drain.cancel()
    assert gateway.calls == {}
    status, body = await healthz(gateway)  # still draining until the process closes
    assert (status, body["status"]) == (503, "draining")
    ended = [e for e in await published_events(gateway) if e["type"] == "call.ended"]
    assert [(e["sip_call_id"], e["reason"]) for e in ended] == [(active.call_id, "shutdown")]


async def test_drain_returns_once_the_last_call_hangs_up(make_gateway, open_peer):
    gateway = await make_gateway()
    caller = Caller(await open_peer(gateway))
    assert (await caller.invite(G711)).status == 200
    await wait_until(lambda: caller.to_tag in gateway.calls, "the call")
    drain = asyncio.create_task(gateway.drain(60))
    try:
        await wait_until(lambda: gateway.draining, "the drain to start")
        assert (await caller.bye()).status == 200
        await asyncio.wait_for(drain, WAIT)  # long before its 60 s
    finally:
        if not drain.done():
            drain.cancel()
    assert not any(isinstance(m, SipRequest) for m in map(parse_message, caller.peer.raw)), \
        "the gateway sent a request (BYE) although the caller hung up"
    ended = [e for e in await published_events(gateway) if e["type"] == "call.ended"]
    assert [e["reason"] for e in ended] == ["bye"]


# An even P..P+1 range holds exactly one pair for RtpPortAllocator; validation once refused it.
def test_one_pair_rtp_range_is_accepted():
    settings = load_settings(environ={"EARSHOT_RTP_PORT_MIN": "40000", "EARSHOT_RTP_PORT_MAX": "40001"})
    assert RtpPortAllocator(settings.rtp_port_min, settings.rtp_port_max).capacity == 1
