"""SRTP with SDES: a=crypto in SDP (RFC 4568), libsrtp contexts (gateway/rtp/srtp.py), and the
gateway taking SRTP calls over SIP over TLS (real sockets, real Gateway, real Redis)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ipaddress
import socket
import ssl
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import sdp
from gateway.rtp.packet import build_rtp
from gateway.rtp.srtp import SUITES, SrtpContext
from gateway.sip.message import NameAddress, SipResponse
from gateway.trunks import Trunk
from tests.tls_certs import TestCa
from tests.unit.test_gateway_failures import make_gateway  # noqa: F401  (fixture)
from tests.unit.test_sip_transport import TcpClient

WAIT = 10.0
KEY30 = bytes(range(30))
KEY28 = bytes(range(100, 128))


def inline(key: bytes) -> str:
    return base64.b64encode(key).decode()


def offer(proto: str = "RTP/SAVP", cryptos: tuple[str, ...] = (), port: int = 40000) -> bytes:
    lines = ["v=0", "o=pbx 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0",
             f"m=audio {port} {proto} 0 101", "a=rtpmap:0 PCMU/8000", "a=rtpmap:101 telephone-event/8000",
             *[f"a=crypto:{c}" for c in cryptos]]
    return ("\r\n".join(lines) + "\r\n").encode()


def negotiate(body: bytes, srtp: str, **kwargs) -> sdp.Negotiated:
    return sdp.negotiate(sdp.parse_sdp(body), local_host="127.0.0.1", local_port=5000, session_id=1,
                         session_version=1, srtp=srtp, **kwargs)


# -- a=crypto ---------------------------------------------------------------------------------

def test_parse_crypto_lines_we_can_honour() -> None:
    c = sdp.parse_crypto(f"1 AES_CM_128_HMAC_SHA1_80 inline:{inline(KEY30)}|2^31")
    assert (c.tag, c.suite, c.key, c.lifetime) == (1, "AES_CM_128_HMAC_SHA1_80", KEY30, "2^31")
    assert str(c) == f"1 AES_CM_128_HMAC_SHA1_80 inline:{inline(KEY30)}|2^31"
    assert sdp.parse_crypto(f"7 AEAD_AES_128_GCM inline:{inline(KEY28)}").key == KEY28
    assert sdp.parse_crypto(f"2 AES_CM_128_HMAC_SHA1_32 inline:{inline(KEY30)}").suite == "AES_CM_128_HMAC_SHA1_32"


@pytest.mark.parametrize(("value", "why"), [
    (f"1 AES_256_CM_HMAC_SHA1_80 inline:{inline(bytes(46))}", "Unsupported crypto suite"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{inline(KEY30)}|2^20|1:4", "MKI"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{inline(KEY30)};inline:{inline(KEY30)}", "Several keys"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{inline(KEY30)} UNENCRYPTED_SRTP", "session parameter"),
    (f"1 AES_CM_128_HMAC_SHA1_80 inline:{inline(KEY28)}", "must be 30 bytes, got 28"),
    ("1 AES_CM_128_HMAC_SHA1_80 inline:not*base64", "not base64"),
    (f"1 AES_CM_128_HMAC_SHA1_80 uri:{inline(KEY30)}", "key method"),
    ("x AES_CM_128_HMAC_SHA1_80", "Malformed a=crypto"),
])
def test_parse_crypto_refuses_what_it_cannot_honour(value: str, why: str) -> None:
    with pytest.raises(sdp.SdpError, match=why):
        sdp.parse_crypto(value)


# -- offer/answer -----------------------------------------------------------------------------

def pjsip_like_offer(proto: str = "RTP/SAVP") -> bytes:
    """PJSIP's order: AES-256 suites we do not take first, then ours."""
    return offer(proto, (f"1 AES_256_CM_HMAC_SHA1_80 inline:{inline(bytes(46))}",
                         f"2 AES_CM_128_HMAC_SHA1_80 inline:{inline(KEY30)}",
                         f"3 AEAD_AES_128_GCM inline:{inline(KEY28)}"))


def answer_crypto(n: sdp.Negotiated) -> sdp.Crypto:
    (audio,) = n.answer.media
    (value,) = [v for name, v in audio.attributes if name == "crypto"]
    return sdp.parse_crypto(value or "")


@pytest.mark.parametrize("policy", ["optional", "required"])
def test_savp_offer_answered_with_our_own_key_under_the_first_usable_tag(policy: str) -> None:
    n = negotiate(pjsip_like_offer(), policy, new_key=lambda size: b"\x42" * size)
    assert n.answer.media[0].proto == "RTP/SAVP"
    crypto = answer_crypto(n)
    assert (crypto.tag, crypto.suite, crypto.key) == (2, "AES_CM_128_HMAC_SHA1_80", b"\x42" * 30)
    assert n.srtp == sdp.SrtpKeys("AES_CM_128_HMAC_SHA1_80", KEY30, b"\x42" * 30, 2)
    assert b"a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:" in n.answer.to_bytes()


def test_fresh_random_keys_by_default_and_kept_on_an_unchanged_reoffer() -> None:
    first, second = negotiate(pjsip_like_offer(), "optional"), negotiate(pjsip_like_offer(), "optional")
    assert first.srtp is not None and second.srtp is not None
    assert first.srtp.local_key != second.srtp.local_key and len(first.srtp.local_key) == 30
    again = negotiate(pjsip_like_offer(), "optional", keep_srtp=first.srtp)
    assert again.srtp == first.srtp
    rekeyed = negotiate(offer(cryptos=(f"1 AES_CM_128_HMAC_SHA1_80 inline:{inline(bytes(30))}",)), "optional",
                        keep_srtp=first.srtp)
    assert rekeyed.srtp is not None and rekeyed.srtp.local_key != first.srtp.local_key


def test_best_effort_crypto_in_rtp_avp() -> None:
    """PJSIP's srtpUse=optional offers RTP/AVP with a=crypto: with SRTP allowed we take it
    (the call is encrypted), with SRTP off we answer plain RTP without a=crypto."""
    body = pjsip_like_offer("RTP/AVP")
    secured = negotiate(body, "optional")
    assert secured.answer.media[0].proto == "RTP/AVP" and secured.srtp is not None
    assert negotiate(body, "required").srtp is not None
    plain = negotiate(body, "off")
    assert plain.srtp is None and b"a=crypto" not in plain.answer.to_bytes()


def test_plain_offer_refused_when_srtp_is_required() -> None:
    assert negotiate(offer("RTP/AVP"), "optional").srtp is None
    with pytest.raises(sdp.SrtpNotAcceptable, match="SRTP required: offer RTP/SAVP with a=crypto"):
        negotiate(offer("RTP/AVP"), "required")


def test_savp_refused_when_srtp_is_off_or_no_crypto_is_usable() -> None:
    with pytest.raises(sdp.SrtpNotAcceptable, match="not accepted here"):
        negotiate(pjsip_like_offer(), "off")
    only_mki = offer(cryptos=(f"1 AES_CM_128_HMAC_SHA1_80 inline:{inline(KEY30)}|2^20|1:4",))
    with pytest.raises(sdp.SrtpNotAcceptable, match="No usable a=crypto"):
        negotiate(only_mki, "required")
    # a codec problem is still reported as one
    g729 = pjsip_like_offer().replace(b"RTP/SAVP 0 101", b"RTP/SAVP 18")
    with pytest.raises(sdp.NoAcceptableCodec, match="No acceptable audio codec") as info:
        negotiate(g729, "optional")
    assert not isinstance(info.value, sdp.SrtpNotAcceptable)


def test_our_srtp_offer_and_the_peers_answer() -> None:
    ours = sdp.build_offer(local_host="127.0.0.1", local_port=5000, session_id=1, session_version=1,
                           srtp="required")
    assert ours.media[0].proto == "RTP/SAVP"
    offered = [sdp.parse_crypto(v or "") for name, v in ours.media[0].attributes if name == "crypto"]
    assert [c.suite for c in offered] == list(sdp.CRYPTO_SUITES) and [c.tag for c in offered] == [1, 2, 3]
    gcm = offered[0]
    answer = offer("RTP/SAVP", (f"1 AEAD_AES_128_GCM inline:{inline(KEY28)}",))
    n = sdp.read_answer(ours, sdp.parse_sdp(answer))
    assert n.srtp == sdp.SrtpKeys("AEAD_AES_128_GCM", KEY28, gcm.key, 1)
    with pytest.raises(sdp.SrtpNotAcceptable):
        sdp.read_answer(ours, sdp.parse_sdp(offer("RTP/AVP")))
    assert sdp.build_offer(local_host="127.0.0.1", local_port=5000, session_id=1, session_version=1,
                           srtp="optional").media[0].proto == "RTP/AVP"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120), st.sampled_from(["RTP/SAVP", "RTP/AVP", "RTP/SAVPF"]),
       st.sampled_from(["optional", "required"]))
def test_any_crypto_line_is_parsed_or_refused_with_sdp_error(value: str, proto: str, policy: str) -> None:
    """Caller-controlled text: only SdpError (then 488/400 with a reason) ever comes out."""
    try:
        sdp.parse_crypto(value)
    except sdp.SdpError:
        pass
    body = offer(proto, (value.replace("\r", " ").replace("\n", " "),
                         f"9 AES_CM_128_HMAC_SHA1_80 inline:{inline(KEY30)}"))
    try:
        n = negotiate(body, policy)
    except sdp.SdpError:
        return
    assert n.srtp is not None  # the good line is always usable


# -- libsrtp contexts -------------------------------------------------------------------------

def pair(suite: str) -> tuple[SrtpContext, SrtpContext]:
    """(ours, the peer's): each decrypts with the other's send key."""
    size = SUITES[suite].master_bytes
    ours_key, theirs_key = bytes([1]) * size, bytes([2]) * size
    return SrtpContext(suite, theirs_key, ours_key), SrtpContext(suite, ours_key, theirs_key)


@pytest.mark.parametrize("suite", list(SUITES))
def test_unprotect_what_the_peer_protects_and_count_the_rest(suite: str) -> None:
    ours, peer = pair(suite)
    packets = [build_rtp(0, seq, seq * 160, 0x1234, bytes([seq % 256]) * 160) for seq in range(1, 6)]
    protected = [peer.protect(p) for p in packets]
    assert all(len(p) > len(q) for p, q in zip(protected, packets))
    assert [ours.unprotect(p) for p in protected] == packets
    assert ours.stats.packets == 5
    assert ours.unprotect(protected[2]) is None and ours.stats.replayed == 1  # replay
    tampered = bytearray(peer.protect(build_rtp(0, 9, 9 * 160, 0x1234, b"\x00" * 160)))
    tampered[20] ^= 1
    assert ours.unprotect(bytes(tampered)) is None and ours.stats.auth_failures == 1
    foreign = SrtpContext(suite, bytes(SUITES[suite].master_bytes), b"\x07" * SUITES[suite].master_bytes)
    assert ours.unprotect(foreign.protect(build_rtp(0, 10, 1600, 0x1234, b"\x01" * 160))) is None
    assert ours.unprotect(build_rtp(0, 11, 1760, 0x1234, b"\x01" * 160)) is None  # plain RTP
    assert ours.unprotect(b"\x80") is None and ours.unprotect(b"\x80" * 2000) is None
    assert ours.stats.auth_failures + ours.stats.errors == 5
    assert ours.stats.packets == 5
    # SRTCP on the RTP port (rtcp-mux): a receiver report
    rtcp = struct.pack("!BBHI", 0x80, 201, 1, 0x1234)
    assert ours.unprotect(peer.protect(rtcp)) == rtcp and ours.stats.rtcp == 1


def test_context_checks_its_keys() -> None:
    with pytest.raises(ValueError, match="must be 30 bytes"):
        SrtpContext("AES_CM_128_HMAC_SHA1_80", bytes(28), bytes(30))
    with pytest.raises(ValueError, match="unsupported SRTP suite"):
        SrtpContext("NULL_HMAC_SHA1_80", bytes(30), bytes(30))


# -- through the gateway: SIP over TLS, SRTP on a real RTP port ---------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    ca = TestCa(tmp_path_factory.mktemp("srtp-tls"))
    return ca, ca.issue("earshot.test")


async def tls_gateway(make_gateway, certs, **overrides):  # noqa: F811
    ca, pem = certs
    gateway = await make_gateway(sip_tls=True, sip_tls_port=0, sip_tls_cert_file=str(pem.cert),
                                 sip_tls_key_file=str(pem.key), **overrides)
    client = ssl.create_default_context(cafile=str(ca.pem.cert))
    return gateway, client


class TlsCaller:
    def __init__(self, client: TcpClient, gateway_port: int) -> None:
        self.client = client
        self.gateway_port = gateway_port
        self.call_id = f"{uuid.uuid4().hex}@127.0.0.1"
        self.to_tag = ""

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> TlsCaller:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
        return cls(TcpClient(reader, writer), port)

    def request(self, method: str, cseq: int, body: bytes = b"") -> bytes:
        to = f"<sip:1000@127.0.0.1:{self.gateway_port}>" + (f";tag={self.to_tag}" if self.to_tag else "")
        lines = [f"{method} sip:1000@127.0.0.1:{self.gateway_port};transport=tls SIP/2.0",
                 f"Via: SIP/2.0/TLS 127.0.0.1:{self.client.port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport",
                 "Max-Forwards: 70", "From: <sip:pbx@127.0.0.1>;tag=pbx1", f"To: {to}", f"Call-ID: {self.call_id}",
                 f"CSeq: {cseq} {method}", f"Contact: <sip:pbx@127.0.0.1:{self.client.port};transport=tls>"]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def invite(self, body: bytes) -> SipResponse:
        self.client.writer.write(self.request("INVITE", 1, body))
        while True:
            response = await self.client.recv()
            if isinstance(response, SipResponse) and response.status >= 200:
                break
        self.to_tag = NameAddress.parse(response.headers.get("to") or "", "To").tag or ""
        if response.status < 300:
            self.client.writer.write(self.request("ACK", 1))
        return response


async def wait_until(condition, what) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        await asyncio.sleep(0.02)


async def test_srtp_call_over_tls_decrypts_the_key_holders_packets_only(make_gateway, certs) -> None:  # noqa: F811
    gateway, context = await tls_gateway(make_gateway, certs)
    caller = await TlsCaller.open(gateway.sip.tls_port, context)
    response = await caller.invite(pjsip_like_offer())
    assert response.status == 200, response.reason
    answer = sdp.parse_sdp(response.body)
    (audio,) = answer.media
    assert audio.proto == "RTP/SAVP"
    crypto = answer_crypto(sdp.Negotiated(answer, 0, "PCMU", None, "", 0, "", False, 20))
    assert crypto.tag == 2 and crypto.key != KEY30
    await wait_until(lambda: gateway.calls, "the call")
    (call,) = gateway.calls.values()
    assert call.srtp is not None and call.srtp.suite.name == "AES_CM_128_HMAC_SHA1_80"
    # the caller (key KEY30) sends 20 SRTP packets; an attacker with its own key 20, and 40 go in clear
    peer = SrtpContext("AES_CM_128_HMAC_SHA1_80", crypto.key, KEY30)
    attacker = SrtpContext("AES_CM_128_HMAC_SHA1_80", crypto.key, bytes(30))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for seq in range(1, 21):
            packet = build_rtp(0, seq, seq * 160, 0xCAFE, b"\xff" * 160)
            sock.sendto(peer.protect(packet), ("127.0.0.1", audio.port))
            sock.sendto(attacker.protect(build_rtp(0, seq + 100, seq * 160, 0xBAD, b"\x00" * 160)),
                        ("127.0.0.1", audio.port))
            sock.sendto(packet, ("127.0.0.1", audio.port))  # the same packet again, in clear: a replayed index
            sock.sendto(build_rtp(0, seq + 500, seq * 160, 0xCAFE, b"\xff" * 160), ("127.0.0.1", audio.port))
        stats = call.srtp.stats
        await wait_until(lambda: stats.packets + stats.auth_failures + stats.replayed >= 80,
                         lambda: f"all 80 packets: {stats} {call.receiver.stats}")
    assert (stats.packets, stats.auth_failures, stats.replayed) == (20, 40, 20)
    assert call.receiver.stats.packets == 20 and call.receiver.stats.malformed == 0
    snapshot = gateway._snapshot()  # what /metrics shows
    assert (snapshot["srtp_packets"], snapshot["srtp_auth_failures"], snapshot["srtp_replayed"]) == (20, 40, 20)


async def test_sdes_over_udp_is_refused_by_default(make_gateway, certs) -> None:  # noqa: F811
    from tests.unit.test_gateway_failures import Caller, SipPeer

    gateway, _ = await tls_gateway(make_gateway, certs)
    peer = await SipPeer.open(gateway.sip_port)
    try:
        response = await Caller(peer).invite(pjsip_like_offer())
        assert (response.status, response.reason) == (
            488, "Not Acceptable Here - SRTP keys (SDES) are accepted over SIP over TLS only, not UDP "
                 "(srtp_sdes_insecure)")
        # the best-effort form is answered with plain RTP, keys ignored
        response = await Caller(peer).invite(pjsip_like_offer("RTP/AVP"))
        assert response.status == 200 and b"a=crypto" not in response.body
    finally:
        peer.close()


async def test_srtp_required_trunk_refuses_plain_rtp_with_488(make_gateway, certs) -> None:  # noqa: F811
    trunk = Trunk("secure-pbx", (ipaddress.ip_network("127.0.0.0/8"),), srtp="required")
    gateway, context = await tls_gateway(make_gateway, certs, trunks=(trunk,))
    caller = await TlsCaller.open(gateway.sip.tls_port, context)
    response = await caller.invite(offer("RTP/AVP"))
    assert (response.status, response.reason) == (
        488, "Not Acceptable Here - SRTP required: offer RTP/SAVP with a=crypto")
    assert gateway.calls == {} and gateway.ports.available == gateway.ports.capacity
    caller2 = await TlsCaller.open(gateway.sip.tls_port, context)
    assert (await caller2.invite(pjsip_like_offer())).status == 200
    # the same trunk over UDP: SRTP cannot be keyed there, so every call is refused, with the reason
    from tests.unit.test_gateway_failures import Caller, SipPeer

    peer = await SipPeer.open(gateway.sip_port)
    try:
        response = await Caller(peer).invite(pjsip_like_offer())
        assert (response.status, response.reason) == (
            488, "Not Acceptable Here - SRTP keys (SDES) are accepted over SIP over TLS only, not UDP "
                 "(srtp_sdes_insecure)")
    finally:
        peer.close()
