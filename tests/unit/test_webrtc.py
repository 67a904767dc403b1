"""WHIP ingest against a real in-process Gateway: an aiortc peer sends a fixture over loopback.

The gateway runs its real HTTP server, session host, Silero VAD and Whisper
(tiny.en); the client is a second aiortc RTCPeerConnection playing a speech
fixture through aiortc's MediaPlayer (Opus over DTLS-SRTP on the host's own
interface). What the session publishes is read back from the real Redis stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

pytest.importorskip("aiortc")

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.contrib.media import MediaPlayer  # noqa: E402

from gateway.app import Gateway  # noqa: E402
from gateway.asr.wer import word_error_rate  # noqa: E402
from gateway.config import load_settings  # noqa: E402
from gateway.events import parse_fields  # noqa: E402
from gateway.ingest.webrtc import OfferError, check_offer, parse_ice_servers  # noqa: E402
from gateway.store import migrate  # noqa: E402
from gateway.store.db import make_engine, make_sessionmaker  # noqa: E402
from gateway.store.users import create_token, create_user  # noqa: E402
from tests.conftest import REDIS_URL  # noqa: E402
from tests.fixtures_data import get_entry  # noqa: E402
from tests.unit.test_gateway_failures import free_rtp_range  # noqa: E402

pytestmark = pytest.mark.slow

FIXTURE = "prompt_queue-youarenext.wav"  # 5.4 s, one sentence
WAIT = 40.0


@dataclasses.dataclass
class Stack:
    gateway: Gateway
    base: str
    token: str
    prefix: str
    redis: Any

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def events(self, call_id: str) -> list[dict[str, Any]]:
        entries = await self.redis.xrange(f"{self.prefix}:events", "-", "+")
        return [e for e in (parse_fields(f) for _, f in entries) if e["call_id"] == call_id]

    async def wait_for(self, call_id: str, type_: str, timeout: float = WAIT) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = await self.events(call_id)
            if any(e["type"] == type_ for e in events):
                return events
            await asyncio.sleep(0.2)
        raise AssertionError(f"no {type_} for {call_id} within {timeout} s: {[e['type'] for e in events]}")


@pytest.fixture(scope="module")
def padded_wav(tmp_path_factory) -> Path:
    """The fixture with 2 s of silence after it, so the turn ends while the peer is still connected."""
    out = tmp_path_factory.mktemp("whip") / "speech.wav"
    subprocess.run(["sox", str(get_entry(FIXTURE).path), "-b", "16", "-e", "signed-integer", str(out),
                    "pad", "0.3", "2.0"], check=True, capture_output=True)
    return out


@pytest.fixture
async def stack(prefix: str, tmp_path: Path) -> AsyncIterator[Stack]:
    url = f"sqlite:///{tmp_path / 'earshot.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as db:
        user = create_user(db, "alice", "a long enough password", "supervisor")
        _, token = create_token(db, user, "whip-test")
        db.commit()
    engine.dispose()
    rtp_min, rtp_max = free_rtp_range(2)
    settings = load_settings(environ={
        "EARSHOT_SIP_HOST": "127.0.0.1", "EARSHOT_SIP_TCP": "false",
        "EARSHOT_HTTP_HOST": "127.0.0.1", "EARSHOT_HTTP_PORT": "0",
        "EARSHOT_RTP_HOST": "127.0.0.1", "EARSHOT_RTP_PORT_MIN": str(rtp_min), "EARSHOT_RTP_PORT_MAX": str(rtp_max),
        "EARSHOT_REDIS_URL": REDIS_URL, "EARSHOT_STREAM_PREFIX": prefix,
        "EARSHOT_PERSIST": "false", "EARSHOT_WEB_ENABLED": "false", "EARSHOT_DATABASE_URL": url,
        "EARSHOT_API_SESSIONS_PER_TOKEN": "1",
    })
    gateway = Gateway(dataclasses.replace(settings, sip_port=0))
    await gateway.start()
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield Stack(gateway, f"http://127.0.0.1:{gateway.http.port}", token, prefix, client)
    finally:
        await gateway.close()
        await client.aclose()


async def offer_from(pc: RTCPeerConnection) -> str:
    await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers its candidates here
    return pc.localDescription.sdp


async def post_offer(http: httpx.AsyncClient, stack: Stack, sdp: str, headers: dict[str, str] | None = None,
                     content_type: str = "application/sdp") -> httpx.Response:
    return await http.post(stack.base + "/v1/whip", content=sdp.encode(),
                           headers={"Content-Type": content_type, **(stack.auth() if headers is None else headers)})


async def test_whip_session_is_transcribed_and_delete_ends_it(stack: Stack, padded_wav: Path) -> None:
    player = MediaPlayer(str(padded_wav))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(player.audio, direction="sendonly")
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            response = await post_offer(http, stack, await offer_from(pc))
            assert response.status_code == 201, response.text
            assert response.headers["content-type"].startswith("application/sdp")
            location = response.headers["location"]
            assert location.startswith("/v1/whip/")
            call_id = location.rsplit("/", 1)[1]
            assert call_id in stack.gateway.sessions.sessions
            assert "a=candidate:" in response.text  # gathered before answering: no trickle
            assert "a=recvonly" in response.text
            await pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))

            # a second session on the same token is over api_sessions_per_token (1)
            other = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            other.addTransceiver("audio", direction="sendonly")
            refused = await post_offer(http, stack, await offer_from(other))
            await other.close()
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "session_limit"

            # the sentence is transcribed while the peer is still connected (the silence after it ends the turn)
            events = await stack.wait_for(call_id, "turn.final")
            assert not any(e["type"] == "call.ended" for e in events)
            started = next(e for e in events if e["type"] == "call.started")
            assert started["source"] == {"kind": "webrtc", "session_id": call_id}
            assert started["legs"] == ["caller"]

            gone = await http.delete(stack.base + location, headers=stack.auth())
            assert gone.status_code == 200, gone.text
            # DELETE answers once the session has ended: call.ended is already published
            await stack.gateway.publisher.flush(10)
            events = await stack.events(call_id)
            ended = [e for e in events if e["type"] == "call.ended"]
            assert len(ended) == 1 and ended[0]["reason"] == "client-closed"
            text = " ".join(e["text"] for e in events if e["type"] == "turn.final")
            wer = word_error_rate(get_entry(FIXTURE).text, text)
            assert wer <= 0.3, (wer, text)
            assert call_id not in stack.gateway.sessions.sessions
            assert stack.gateway.api.extra["webrtc"].resources == {}
            # the slot is free again, and the resource is gone
            again = await http.delete(stack.base + location, headers=stack.auth())
            assert again.status_code == 404
    finally:
        await pc.close()


async def test_peer_that_closes_without_delete_ends_its_session(stack: Stack, padded_wav: Path) -> None:
    player = MediaPlayer(str(padded_wav))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(player.audio, direction="sendonly")
    async with httpx.AsyncClient(timeout=30) as http:
        response = await post_offer(http, stack, await offer_from(pc))
        assert response.status_code == 201, response.text
        call_id = response.headers["location"].rsplit("/", 1)[1]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
        deadline = time.monotonic() + WAIT
        while pc.connectionState != "connected" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert pc.connectionState == "connected"
        await asyncio.sleep(2.0)  # mid-sentence
        await pc.close()
        events = await stack.wait_for(call_id, "call.ended")
        assert [e["reason"] for e in events if e["type"] == "call.ended"] == ["client-closed"]
        # the speech heard before the peer left is finalised, not lost
        assert any(e["type"] == "turn.final" and e["text"].strip() for e in events), events
        deadline = time.monotonic() + 5
        while stack.gateway.api.extra["webrtc"].resources and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert stack.gateway.api.extra["webrtc"].resources == {}
        assert stack.gateway.api.limits.open_count(_caller_of(stack)) == 0


def _caller_of(stack: Stack) -> Any:
    from gateway.ingest.auth import Caller
    from gateway.store.users import token_digest

    return Caller("alice", "token:" + token_digest(stack.token)[:16])


VIDEO_ONLY = """v=0
o=- 1 1 IN IP4 0.0.0.0
s=-
t=0 0
a=group:BUNDLE 0
a=fingerprint:sha-256 00:11
a=ice-ufrag:abcd
a=ice-pwd:abcdefghijklmnopqrstuvwx
m=video 9 UDP/TLS/RTP/SAVPF 96
c=IN IP4 0.0.0.0
a=mid:0
a=sendonly
a=rtpmap:96 VP8/90000
"""


async def test_bad_offers_are_refused_with_the_reason(stack: Stack) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendonly")
    good = await offer_from(pc)
    await pc.close()
    async with httpx.AsyncClient(timeout=30) as http:
        # no credentials, or a wrong token: 401 with the scheme to use
        for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic eDp5"}):
            r = await post_offer(http, stack, good, headers=headers)
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
        r = await post_offer(http, stack, good, content_type="application/json")
        assert r.status_code == 415 and "application/sdp" in r.json()["error"]["message"]
        r = await post_offer(http, stack, "hello, this is not SDP")
        assert r.status_code == 400 and "v=0" in r.json()["error"]["message"], r.text
        r = await post_offer(http, stack, re.sub(r"m=audio \d+ ", "m=audio forty ", good))
        assert r.status_code == 400 and "'forty'" in r.json()["error"]["message"], r.text
        r = await post_offer(http, stack, "\n".join(line for line in good.splitlines()
                                                    if not line.startswith("a=fingerprint")) + "\n")
        assert r.status_code == 400 and "fingerprint" in r.json()["error"]["message"], r.text
        r = await post_offer(http, stack, VIDEO_ONLY)
        assert r.status_code == 422 and r.json()["error"]["code"] == "no_audio", r.text
        r = await post_offer(http, stack, good.replace("a=sendonly", "a=recvonly"))
        assert r.status_code == 422 and "not sent" in r.json()["error"]["message"], r.text
        # Opus, PCMU and PCMA all removed: aiortc finds no codec in common
        no_codec = re.sub(r"m=audio (\d+) (\S+) [0-9 ]+", r"m=audio \1 \2 98", good)
        no_codec = "".join(line + "\r\n" for line in no_codec.splitlines()
                           if not line.startswith(("a=rtpmap", "a=fmtp", "a=rtcp-fb")))
        r = await post_offer(http, stack, no_codec + "a=rtpmap:98 G7221/16000\r\n")
        assert r.status_code == 422 and r.json()["error"]["code"] == "no_common_codec", r.text
        # a draining gateway (or one at max_calls) takes no new session
        stack.gateway.sessions.draining = True
        r = await post_offer(http, stack, good)
        stack.gateway.sessions.draining = False
        assert r.status_code == 503 and r.json()["error"]["code"] == "gateway_busy", r.text
        assert "retry-after" in r.headers
        r = await http.delete(stack.base + "/v1/whip/00000000-0000-0000-0000-000000000000", headers=stack.auth())
        assert r.status_code == 404
        r = await http.delete(stack.base + "/v1/whip/00000000-0000-0000-0000-000000000000")
        assert r.status_code == 401
        r = await http.patch(stack.base + "/v1/whip/x", headers={**stack.auth(), "Content-Type":
                                                                  "application/trickle-ice-sdpfrag"})
        assert r.status_code == 405
    # nothing refused left a session, a peer or a slot behind
    assert stack.gateway.sessions.sessions == {}
    assert stack.gateway.api.extra["webrtc"].resources == {}
    assert stack.gateway.api.limits.open_count(_caller_of(stack)) == 0


def test_check_offer_and_ice_servers_without_a_network() -> None:
    with pytest.raises(OfferError) as info:
        check_offer(b"", "application/sdp")
    assert info.value.status == 400 and "empty" in info.value.message
    with pytest.raises(OfferError) as info:
        check_offer(b"v=0\r\n" + b"a=x\r\n" * 20000, "application/sdp")
    assert info.value.status == 413
    with pytest.raises(OfferError) as info:
        check_offer(b"\xff\xfe", "application/sdp; charset=utf-8")
    assert info.value.status == 400 and "UTF-8" in info.value.message
    assert parse_ice_servers("") == []
    assert parse_ice_servers("stun:stun.example.com:3478, turn:bob:secret@turn.example.com:3478?transport=udp") == [
        ("stun:stun.example.com:3478", None, None),
        ("turn:turn.example.com:3478?transport=udp", "bob", "secret"),
    ]
