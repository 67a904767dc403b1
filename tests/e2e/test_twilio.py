"""Twilio Media Streams end to end: a client written from Twilio's published message
format, against a real `earshot run` process.

The client plays what Twilio sends for a ``<Start><Stream track="both_tracks">``: a
``connected`` and a ``start`` message (streamSid, callSid, accountSid, both tracks,
the ``<Parameter>`` values, mu-law 8 kHz mono), then every 20 ms one ``media``
message of 160 mu-law bytes per track, base64, stamped with its ms since the stream
started, a ``dtmf`` and a ``mark``, and ``stop``. Two different recordings go on the
two tracks in real time; on the outbound track the long silences are left out, as
Twilio does in some cases, so the server must place media by its timestamp to keep
that leg's offsets in stream time. Bad messages are mixed in and must not end the
stream.

The gateway transcribes with the packaged Whisper model and publishes to the
machine's Redis under this module's own stream prefix; the checks read what it
published: both legs transcribed (WER against the references) and attributed to
the right leg, the digit, the source (kind twilio with the call's and stream's
sids). Alongside run the refusals (no credential, a wrong token, a bad signature:
close 1008; a second stream on a token at its limit: close 1013; no start: close
1008) and a stream authenticated by Twilio's request signature alone, which the
client drops mid-sentence: its open turn must still be finalised and published.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.asr.wer import word_error_rate
from gateway.ingest.twilio.signature import compute_signature
from tests.e2e.harness import add_user, new_token, read_events, running_gateway
from tests.fixtures_data import get_entry, read_g711, read_pcm16

pytestmark = [pytest.mark.e2e]

INBOUND = "caller_02_conference.wav"  # five turns, 18 s
OUTBOUND = "caller_03_greetings.wav"  # four turns, 20 s, another recording
SIGNED = "prompt_tt-allbusy.wav"  # one 8.5 s sentence, cut off by the client after 6 s
TWILIO_AUTH_TOKEN = "e2e-twilio-auth-token-" + uuid.uuid4().hex[:8]
PUBLIC_HOST = "earshot.example.com"  # what the TwiML's <Stream url> names; a TLS proxy forwards it
CHUNK = 160  # bytes of mu-law: 20 ms
WER_BOUND = 0.35  # tiny.en on 8 kHz G.711 turns (tests/e2e/test_calls.py uses 0.25 for whole calls)
QUIET_RUN = 10  # outbound: runs of at least this many quiet 20 ms chunks are not sent
QUIET_PEAK = 100
ALIGN_MS = 700  # an agent turn starts within this of a turn of its recording, in stream time
ACCOUNT = "AC" + "0123456789abcdef" * 2


def sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('twilio') / 'earshot.db'}"
    with running_gateway({"EARSHOT_DATABASE_URL": url, "EARSHOT_TWILIO_AUTH_TOKEN": TWILIO_AUTH_TOKEN,
                          "EARSHOT_API_SESSIONS_PER_TOKEN": "1", "EARSHOT_MAX_CALLS": "2"}) as gw:
        tokens = {}
        for user in ("alice", "bob"):
            add_user(url, user, "a long enough password 1", role="supervisor")
            tokens[user] = new_token(url, user, "twilio")
        gw.tokens = tokens  # type: ignore[attr-defined]
        yield gw


class TwilioClient:
    """What Twilio sends on a Media Stream, message by message (Twilio's published format)."""

    def __init__(self, ws, stream_sid: str, call_sid: str) -> None:
        self.ws = ws
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.seq = 0
        self.chunks: dict[str, int] = {}

    async def send(self, body: dict) -> None:
        self.seq += 1
        await self.ws.send(json.dumps({**body, "sequenceNumber": str(self.seq)}))

    async def connected(self) -> None:
        await self.ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))

    async def start(self, tracks: list[str], parameters: dict[str, str]) -> None:
        await self.send({"event": "start", "streamSid": self.stream_sid, "start": {
            "streamSid": self.stream_sid, "accountSid": ACCOUNT, "callSid": self.call_sid, "tracks": tracks,
            "customParameters": parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})

    async def media(self, track: str, timestamp_ms: int, ulaw: bytes) -> None:
        self.chunks[track] = self.chunks.get(track, 0) + 1
        await self.send({"event": "media", "streamSid": self.stream_sid, "media": {
            "track": track, "chunk": str(self.chunks[track]), "timestamp": str(timestamp_ms),
            "payload": base64.b64encode(ulaw).decode("ascii")}})

    async def dtmf(self, digit: str) -> None:
        await self.send({"event": "dtmf", "streamSid": self.stream_sid,
                         "dtmf": {"track": "inbound_track", "digit": digit}})

    async def mark(self, name: str) -> None:
        await self.send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    async def stop(self) -> None:
        await self.send({"event": "stop", "streamSid": self.stream_sid,
                         "stop": {"accountSid": ACCOUNT, "callSid": self.call_sid}})


def chunks(name: str) -> list[bytes]:
    ulaw, codec = read_g711(name)
    assert codec == "PCMU"  # Twilio streams mu-law
    return [ulaw[i:i + CHUNK] for i in range(0, len(ulaw) - CHUNK + 1, CHUNK)]


def omitted_silence(name: str) -> set[int]:
    """Indexes of the 20 ms chunks inside long quiet runs (left out, as Twilio may do)."""
    pcm, _ = read_pcm16(name)
    samples = np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.int32))
    peaks = samples[:len(samples) // CHUNK * CHUNK].reshape(-1, CHUNK).max(axis=1)
    quiet = list(peaks < QUIET_PEAK)
    out: set[int] = set()
    i = 0
    while i < len(quiet):
        j = i
        while j < len(quiet) and quiet[j]:
            j += 1
        if j - i >= QUIET_RUN:
            out.update(range(i, j))
        i = max(j, i + 1)
    return out


def media_url(gw) -> str:
    return f"ws://127.0.0.1:{gw.http_port}/twilio/media"


async def closed_with(ws, timeout: float = 15) -> tuple[int | None, str | None]:
    try:
        while True:  # the server never sends anything; recv returns only by the close
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed:
        pass
    return ws.close_code, ws.close_reason


async def replay_both_tracks(gw, stream_sid: str, call_sid: str) -> dict:
    inbound, outbound = chunks(INBOUND), chunks(OUTBOUND)
    skip = omitted_silence(OUTBOUND)
    async with connect(media_url(gw)) as ws:
        client = TwilioClient(ws, stream_sid, call_sid)
        await client.connected()
        await client.start(["inbound", "outbound"], {"token": gw.tokens["alice"], "tags": "twilio-e2e",
                                                     "FirstName": "Jane"})
        t0 = time.monotonic()
        for k in range(max(len(inbound), len(outbound))):
            await asyncio.sleep(max(0.0, t0 + k * 0.02 - time.monotonic()))
            if k < len(inbound):
                await client.media("inbound", k * 20, inbound[k])
            if k < len(outbound) and k not in skip:
                await client.media("outbound", k * 20, outbound[k])
            if k == 150:  # 3 s in: what a broken or hostile peer might send; the stream stays up
                await ws.send("{this is not json")
                await ws.send(json.dumps({"event": "transcribe-faster", "streamSid": stream_sid}))
                await ws.send(json.dumps({"event": "media", "streamSid": stream_sid, "media": {
                    "track": "inbound", "chunk": "0", "timestamp": str(k * 20), "payload": "%%% not base64 %%%"}}))
                await ws.send(json.dumps({"event": "media", "streamSid": stream_sid, "media": {
                    "track": "sideways", "chunk": "1", "timestamp": str(k * 20),
                    "payload": base64.b64encode(inbound[k]).decode()}}))
                await ws.send(b"\x00binary")
            if k == 450:
                await client.dtmf("7")
                await client.mark("prompt-1")
        await client.stop()
        code, _ = await closed_with(ws)
    return {"close": code, "omitted_ms": 20 * len(skip)}


async def refused(gw, parameters: dict[str, str], headers: dict[str, str] | None = None,
                  after_s: float = 0.0) -> tuple[str, int | None, str | None]:
    await asyncio.sleep(after_s)
    stream_sid = sid("MZ")
    async with connect(media_url(gw), additional_headers=headers or {}) as ws:
        client = TwilioClient(ws, stream_sid, sid("CA"))
        await client.connected()
        await client.start(["inbound"], parameters)
        for k in range(25):  # audio that must not be transcribed
            await client.media("inbound", k * 20, b"\x10" * CHUNK)
        code, reason = await closed_with(ws)
    return stream_sid, code, reason


async def signed_then_dropped(gw, stream_sid: str) -> None:
    """Authenticated by X-Twilio-Signature alone (no token); the socket drops mid-sentence."""
    signed_url = f"wss://{PUBLIC_HOST}/twilio/media"
    headers = {"X-Twilio-Signature": compute_signature(TWILIO_AUTH_TOKEN, signed_url),
               "X-Forwarded-Host": PUBLIC_HOST, "X-Forwarded-Proto": "https"}
    audio = chunks(SIGNED)
    async with connect(media_url(gw), additional_headers=headers) as ws:
        client = TwilioClient(ws, stream_sid, sid("CA"))
        await client.connected()
        await client.start(["inbound"], {})
        t0 = time.monotonic()
        for k in range(300):  # 6 s of a sentence that lasts 8.5 s
            await asyncio.sleep(max(0.0, t0 + k * 0.02 - time.monotonic()))
            await client.media("inbound", k * 20, audio[k])
    # the context manager closed the socket without a stop message


async def over_the_token_limit(gw, after_sid: str) -> tuple[str, int | None, str | None, int | None]:
    """bob may hold one session (api_sessions_per_token=1): a second one is refused with 1013.

    Run once the stream ``after_sid`` has ended, so that the gateway (max_calls=2) has room."""
    await asyncio.to_thread(wait_ended, gw.events_stream, {after_sid}, 60)
    first_sid, second_sid = sid("MZ"), sid("MZ")
    async with connect(media_url(gw)) as first:
        c1 = TwilioClient(first, first_sid, sid("CA"))
        await c1.connected()
        await c1.start(["inbound"], {"token": gw.tokens["bob"]})
        await c1.media("inbound", 0, b"\xff" * CHUNK)
        await asyncio.sleep(1.0)  # the first session is open
        async with connect(media_url(gw)) as second:
            c2 = TwilioClient(second, second_sid, sid("CA"))
            await c2.connected()
            await c2.start(["inbound"], {"token": gw.tokens["bob"]})
            second_code, second_reason = await closed_with(second)
        await c1.stop()
        first_code, _ = await closed_with(first)
    return second_sid, second_code, second_reason, first_code


async def never_starts(gw) -> int | None:
    async with connect(media_url(gw)) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        code, _ = await closed_with(ws, timeout=30)
    return code


def wait_ended(stream: str, stream_sids: set[str], timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        events = read_events(stream)
        ended = {e["source"].get("stream_sid") for e in events if e["type"] == "call.ended"}
        if stream_sids <= ended or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def of_stream(events: list[dict], stream_sid: str) -> list[dict]:
    return [e for e in events if e.get("source", {}).get("stream_sid") == stream_sid]


def leg_text(events: list[dict], leg: str) -> str:
    finals = sorted((e for e in events if e["type"] == "turn.final" and e.get("leg") == leg),
                    key=lambda e: e["start_ms"])
    return " ".join(e["text"] for e in finals)


async def test_twilio_media_stream_both_tracks_transcribed_and_attributed(gateway):
    main_sid, main_call = sid("MZ"), sid("CA")
    signed_sid = sid("MZ")
    bad_signature = {"X-Twilio-Signature": compute_signature("not-the-auth-token", f"wss://{PUBLIC_HOST}/twilio/media"),
                     "X-Forwarded-Host": PUBLIC_HOST, "X-Forwarded-Proto": "https"}
    (main, no_credential, wrong_token, forged, full, limit, no_start, _) = await asyncio.gather(
        replay_both_tracks(gateway, main_sid, main_call),
        refused(gateway, {}),
        refused(gateway, {"token": "es_not-a-real-token"}),
        refused(gateway, {}, bad_signature),
        # 2 s in, the main and the signed streams fill the gateway's max_calls=2
        refused(gateway, {"token": gateway.tokens["bob"]}, after_s=2.0),
        over_the_token_limit(gateway, after_sid=signed_sid),
        never_starts(gateway),
        signed_then_dropped(gateway, signed_sid),
    )
    events = wait_ended(gateway.events_stream, {main_sid, signed_sid})
    log = gateway.log()

    # -- the refusals: closed with the code a client can act on, nothing opened or published
    for (stream_sid, code, reason), what in ((no_credential, "no credential"), (wrong_token, "wrong token"),
                                             (forged, "bad signature")):
        assert (code, reason) == (1008, "unauthorized"), (what, code, log)
        assert of_stream(events, stream_sid) == [], what
    full_sid, full_code, full_reason = full
    assert (full_code, full_reason) == (1013, "gateway at capacity"), log
    assert of_stream(events, full_sid) == []
    over_sid, over_code, over_reason, first_code = limit
    assert (over_code, over_reason) == (1013, "token session limit reached"), log
    assert of_stream(events, over_sid) == []
    assert first_code == 1000
    assert no_start == 1008
    assert "no token parameter and no X-Twilio-Signature" in log
    assert "X-Twilio-Signature does not match" in log

    # -- the main stream: one session, source twilio with the call's ids, on every event
    assert main["close"] == 1000
    assert main["omitted_ms"] >= 2000  # the outbound track really had gaps to place
    mine = of_stream(events, main_sid)
    types = [e["type"] for e in mine]
    assert types[0] == "call.started" and types[-1] == "call.ended", types
    for e in mine:
        assert e["source"] == {"kind": "twilio", "call_sid": main_call, "stream_sid": main_sid,
                               "account_sid": ACCOUNT}, e
        assert e["tags"] == ["twilio-e2e"]
        assert "sip_call_id" not in e
    assert mine[0]["legs"] == ["caller", "agent"]
    assert gateway.tokens["alice"] not in json.dumps(mine)  # the token parameter is never published
    assert mine[-1]["reason"] == "stop" and mine[-1]["dtmf"] == 1

    [dtmf] = [e for e in mine if e["type"] == "dtmf"]
    assert dtmf["digit"] == "7" and dtmf["leg"] == "caller"

    # both legs transcribed, each with its own recording's words
    inbound, outbound = get_entry(INBOUND), get_entry(OUTBOUND)
    caller_text, agent_text = leg_text(mine, "caller"), leg_text(mine, "agent")
    caller_wer = word_error_rate(inbound.text, caller_text)
    agent_wer = word_error_rate(outbound.text, agent_text)
    assert caller_wer <= WER_BOUND, (caller_wer, caller_text)
    assert agent_wer <= WER_BOUND, (agent_wer, agent_text)
    assert word_error_rate(outbound.text, caller_text) > caller_wer + 0.3, caller_text
    assert word_error_rate(inbound.text, agent_text) > agent_wer + 0.3, agent_text

    # the agent's turns sit where they were said in stream time, although ~5 s of its
    # silences were never sent: media is placed by timestamp, gaps filled
    starts = [t.start_ms for t in outbound.turns]
    agent_finals = [e for e in mine if e["type"] == "turn.final" and e["leg"] == "agent"]
    assert len(agent_finals) >= 3
    for e in agent_finals:
        assert min(abs(e["start_ms"] - s) for s in starts) <= ALIGN_MS, (e["start_ms"], starts)
    assert max(e["end_ms"] for e in agent_finals) >= outbound.turns[-1].end_ms - ALIGN_MS

    # the bad messages were logged and counted, and did not end the stream
    for code in ("invalid-json", "unknown-event", "invalid-payload", "unknown-track", "binary-frame"):
        assert f"{code}:" in log, code
    assert f"twilio stream {main_sid} closed" in log
    summary = next(line for line in log.splitlines() if f"twilio stream {main_sid} closed" in line)
    assert "invalid-json x1" in summary and "unknown-track x1" in summary, summary

    # -- authenticated by Twilio's signature alone, dropped mid-sentence: the turn is finalised
    signed = of_stream(events, signed_sid)
    assert signed[0]["type"] == "call.started" and signed[-1]["type"] == "call.ended"
    assert signed[-1]["reason"] == "client-closed"
    finals = [e for e in signed if e["type"] == "turn.final"]
    assert finals, [e["type"] for e in signed]
    said = set(get_entry(SIGNED).text.lower().replace(",", "").replace(".", "").split())
    heard = set(" ".join(e["text"] for e in finals).lower().replace(",", "").replace(".", "").split())
    assert len(said & heard) >= 3, (heard, said)
