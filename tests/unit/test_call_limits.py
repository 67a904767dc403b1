"""Bounded media and calls, through a real Gateway on loopback (real SIP and RTP over UDP):
held calls and every call end, a sender cannot make audio run ahead of time, DTMF floods
are capped, a stranger cannot latch a call's media; and the leg's backlog cap (real VAD)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import numpy as np
import pytest

from gateway.events import CallInfo, EventFactory
from gateway.media.turn import TurnConfig
from gateway.media.vad import SileroVad
from gateway.pipeline import CHUNK, LegPipeline
from gateway.asr.media_only import MediaOnlyTranscriber
from gateway.rtp.packet import build_rtp
from tests.unit.test_gateway_failures import (  # noqa: F401  (fixtures)
    G711,
    Caller,
    audio_stream,
    make_gateway,
    offer,
    open_peer,
    published_events,
    wait_until,
)

HOLD_OFFERS = {
    "sendonly": offer(direction="sendonly"),
    "inactive": offer(direction="inactive"),
    "c=0.0.0.0": G711.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 0.0.0.0"),
}


async def ended_reasons(gateway) -> list[str]:
    return [e["reason"] for e in await published_events(gateway) if e["type"] == "call.ended"]


def rtp_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


# -- every call ends ---------------------------------------------------------------------

@pytest.mark.parametrize("hold", list(HOLD_OFFERS))
async def test_a_held_call_ends_after_hold_timeout(make_gateway, open_peer, hold):
    # before: hold switched the media timeout off and nothing else ended the call
    gateway = await make_gateway(hold_timeout_s=1.0, media_timeout_s=300)
    caller = Caller(await open_peer(gateway))
    assert (await caller.invite(G711)).status == 200
    assert (await caller.invite(HOLD_OFFERS[hold])).status == 200  # re-INVITE: hold
    assert gateway.calls[caller.to_tag].on_hold
    bye = await caller.expect_request("BYE", timeout=5.0)
    caller.respond(bye, 200, "OK")
    await wait_until(lambda: not gateway.calls, "the call to end")
    assert await ended_reasons(gateway) == ["hold-timeout"]


async def test_resume_restarts_the_hold_clock(make_gateway, open_peer):
    gateway = await make_gateway(hold_timeout_s=1.5, media_timeout_s=300)
    caller = Caller(await open_peer(gateway))
    assert (await caller.invite(HOLD_OFFERS["sendonly"])).status == 200  # held from the start
    await asyncio.sleep(1.0)
    assert (await caller.invite(offer(version=2))).status == 200  # resumed
    await asyncio.sleep(1.0)
    assert (await caller.invite(offer(direction="inactive", version=3))).status == 200  # held again
    await asyncio.sleep(1.0)
    assert caller.to_tag in gateway.calls  # 3 s in all, never 1.5 s held at once
    bye = await caller.expect_request("BYE", timeout=5.0)
    caller.respond(bye, 200, "OK")
    assert await ended_reasons(gateway) == ["hold-timeout"]


async def test_every_call_ends_after_max_call_s(make_gateway, open_peer):
    gateway = await make_gateway(max_call_s=1.5, media_timeout_s=300)
    caller = Caller(await open_peer(gateway))
    assert (await caller.invite(G711)).status == 200
    started = time.monotonic()
    bye = await caller.expect_request("BYE", timeout=5.0)
    assert time.monotonic() - started >= 1.0
    caller.respond(bye, 200, "OK")
    await wait_until(lambda: not gateway.calls, "the call to end")
    assert await ended_reasons(gateway) == ["max-duration"]


# -- RTP a caller controls -------------------------------------------------------------------

async def test_timestamps_jumping_seconds_per_packet_make_no_more_audio_than_time(make_gateway, open_peer):
    """The issue's trigger (1000 packets in 20 s made 5015 s of audio), compressed: 400 packets
    in about 2 s, each 5 s of timestamp past the one before, some faster than real time."""
    gateway = await make_gateway()
    caller = Caller(await open_peer(gateway))
    answer = await caller.invite(G711)
    port, _ = audio_stream(answer.body)
    call = gateway.calls[caller.to_tag]
    with rtp_socket() as sender:
        started = time.monotonic()
        for i in range(400):
            sender.sendto(build_rtp(0, i, (i * 40_000) & 0xFFFFFFFF, 0x5EED, b"\xff" * 160), ("127.0.0.1", port))
            if i % 4 == 0:
                await asyncio.sleep(0.02)
        await wait_until(lambda: call.receiver.stats.packets >= 400, "the packets to arrive")
        elapsed = time.monotonic() - started
    audio_seconds = call.receiver.position / 8000
    assert audio_seconds <= elapsed * 1.01 + 1.0 + 0.1, (audio_seconds, elapsed)  # unbounded: ~2000 s
    assert call.receiver.stats.resyncs >= 390
    assert (await caller.bye()).status == 200


async def test_a_dtmf_flood_is_capped_and_counted(make_gateway, open_peer):
    gateway = await make_gateway(dtmf_max_per_s=10.0, dtmf_max_per_call=15)
    caller = Caller(await open_peer(gateway))
    answer = await caller.invite(G711)
    port, _ = audio_stream(answer.body)
    call = gateway.calls[caller.to_tag]
    with rtp_socket() as sender:
        for i in range(300):  # every packet a new event (new timestamp), End bit set: 300 digits
            payload = struct.pack("!BBH", i % 10, 0x80 | 10, 800)
            sender.sendto(build_rtp(101, i, 160 * i, 0xD7, payload), ("127.0.0.1", port))
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        await wait_until(lambda: call.receiver.stats.packets >= 300, "the packets to arrive")
        await asyncio.sleep(1.5)  # the bucket refills: the per-call total caps what follows
        for i in range(300, 320):
            payload = struct.pack("!BBH", 1, 0x80 | 10, 800)
            sender.sendto(build_rtp(101, i, 160 * i, 0xD7, payload), ("127.0.0.1", port))
        await wait_until(lambda: call.receiver.stats.packets >= 320, "the packets to arrive")
    assert (await caller.bye()).status == 200
    await wait_until(lambda: not gateway.calls, "the call to end")
    events = await published_events(gateway)
    digits = [e for e in events if e["type"] == "dtmf"]
    assert len(digits) == 15  # 10 at once, then the total's last 5
    assert gateway._snapshot()["dtmf_dropped"] == 320 - 15
    ended = [e for e in events if e["type"] == "call.ended"]
    assert ended[0]["dtmf"] == 15


async def test_a_stranger_cannot_latch_while_the_caller_is_late(make_gateway, open_peer):
    # SDP names 127.0.0.2, SIP comes from 127.0.0.1: a sender on 127.0.0.3 is neither
    gateway = await make_gateway()
    caller = Caller(await open_peer(gateway))
    answer = await caller.invite(G711.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 127.0.0.2"))
    port, _ = audio_stream(answer.body)
    call = gateway.calls[caller.to_tag]
    with rtp_socket("127.0.0.3") as stranger, rtp_socket("127.0.0.2") as legitimate:
        for i in range(75):  # 1.5 s: longer than the old latch grace (1 s)
            stranger.sendto(build_rtp(0, i, 160 * i, 0xBAD, b"\x00" * 160), ("127.0.0.1", port))
            await asyncio.sleep(0.02)
        await wait_until(lambda: call.receiver.stats.packets >= 75, "the stranger's packets")
        assert call.receiver.latched is None and call.receiver.position == 0
        for i in range(10):
            legitimate.sendto(build_rtp(0, 500 + i, 160 * i, 0x600D, b"\xff" * 160), ("127.0.0.1", port))
        await wait_until(lambda: call.receiver.latched is not None, "the caller's media to latch")
        assert call.receiver.latched == legitimate.getsockname()
        stranger.sendto(build_rtp(0, 75, 160 * 75, 0xBAD, b"\x00" * 160), ("127.0.0.1", port))
        await wait_until(lambda: call.receiver.stats.foreign_dropped >= 76, "the stranger's last packet")
    assert (await caller.bye()).status == 200


async def test_latch_any_still_takes_a_stranger_after_the_grace(make_gateway, open_peer):
    gateway = await make_gateway(rtp_latch="any")
    caller = Caller(await open_peer(gateway))
    answer = await caller.invite(G711.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 127.0.0.2"))
    port, _ = audio_stream(answer.body)
    call = gateway.calls[caller.to_tag]
    with rtp_socket("127.0.0.3") as stranger:
        for i in range(60):
            stranger.sendto(build_rtp(0, i, 160 * i, 0xBAD, b"\x00" * 160), ("127.0.0.1", port))
            await asyncio.sleep(0.02)
        await wait_until(lambda: call.receiver.latched is not None, "the latch")
        assert call.receiver.latched == stranger.getsockname()
    assert (await caller.bye()).status == 200


async def test_rtp_ports_of_consecutive_calls_are_not_sequential(make_gateway, open_peer):
    gateway = await make_gateway(pairs=200)
    peer = await open_peer(gateway)
    ports = []
    for _ in range(6):
        caller = Caller(peer)
        ports.append(audio_stream((await caller.invite(G711)).body)[0])
        assert (await caller.bye()).status == 200
    steps = {b - a for a, b in zip(ports, ports[1:])}
    assert steps != {2} and len(set(ports)) == 6, ports  # in order, each call took the next pair


# -- the leg's backlog -----------------------------------------------------------------------

async def test_backlog_beyond_the_cap_is_shed_as_silence_and_the_timeline_stays_exact():
    events = EventFactory(CallInfo("call-b", "sip-b", "a", "b", time.time()))
    published = []
    leg = LegPipeline(key="call-b/caller", leg="caller", events=events, publish=published.append,
                      transcriber=MediaOnlyTranscriber(), turn_config=TurnConfig(), language=None,
                      partials=False, max_backlog=50)
    vad = SileroVad()
    vad.add_stream(leg.key)
    second = np.zeros(8000, np.int16).tobytes()
    for _ in range(20):  # 20 s of audio while the VAD hears none of it
        leg.feed_audio(second, time.monotonic())
    assert len(leg._ready) == 50  # bounded: 1.6 s of chunks, not 20 s
    total = 20 * 8000 // CHUNK
    assert leg.shed_chunks == total - 50
    heard = 0
    while (chunk := leg.next_chunk()) is not None:
        leg.on_vad(chunk, vad.infer({leg.key: chunk})[leg.key])
        heard += 1
    assert heard == 50  # only the kept chunks went through the model
    assert leg._processed == total  # the shed ones were heard as silence, in their place
    await leg.close()
