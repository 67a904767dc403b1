"""The call-control stream through a real Gateway (UDP SIP peer written by hand, the machine's Redis):
transfer by REFER with NOTIFY progress, hangup, pause/resume, validation, idempotency."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from gateway.callcontrol import CommandError, parse_command
from gateway.sip.message import SipRequest, parse_cseq
from tests.conftest import REDIS_URL
from tests.unit.test_gateway_failures import (  # noqa: F401  (fixtures)
    G711,
    Caller,
    branch,
    make_gateway,
    open_peer,
    published_events,
    wait_until,
)
from tests.waiting import wait_for

TARGET = "sip:billing-queue@127.0.0.1:5999"


@pytest.fixture
async def client():
    c = aioredis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


async def answered_call(gateway, open_peer) -> tuple[Caller, str]:
    caller = Caller(await open_peer(gateway))
    response = await caller.invite(G711)
    assert response.status == 200
    await wait_until(lambda: caller.to_tag in gateway.calls and gateway.calls[caller.to_tag].confirmed
                     and gateway.calls[caller.to_tag].session is not None, "the call to be confirmed")
    return caller, gateway.calls[caller.to_tag].call_id


async def results(client, prefix, command_id: str, count: int) -> list[dict]:
    stream = f"{prefix}:control:results"

    async def read():
        rows = [json.loads(f[b"data"]) for _, f in await client.xrange(stream)]
        mine = [r for r in rows if r["command_id"] == command_id]
        return mine if len(mine) >= count else None

    return await wait_for(read, 10, f"{count} results of {command_id}")


def notify(caller: Caller, frag: str, state: str) -> bytes:
    caller.cseq += 1
    base = caller.request("NOTIFY", cseq=caller.cseq, via_branch=branch()).decode()
    body = frag + "\r\n"
    head = base.replace("Content-Length: 0\r\n\r\n",
                        f"Event: refer\r\nSubscription-State: {state}\r\n"
                        f"Content-Type: message/sipfrag;version=2.0\r\nContent-Length: {len(body)}\r\n\r\n")
    return (head + body).encode()


async def test_transfer_refer_notify_progress_then_bye_and_outcome(make_gateway, open_peer, client, prefix):
    gateway = await make_gateway()
    caller, call_id = await answered_call(gateway, open_peer)
    await client.xadd(f"{prefix}:control", {"command_id": "t-1", "call_id": call_id, "action": "transfer",
                                            "target": TARGET})
    refer = await caller.expect_request("REFER")
    assert refer.headers.get("refer-to") == f"<{TARGET}>"
    assert parse_cseq(refer.headers.get("cseq") or "")[1] == "REFER"
    caller.respond(refer, 202, "Accepted")
    (accepted,) = await results(client, prefix, "t-1", 1)
    assert (accepted["outcome"], accepted["sip_status"], accepted["call_id"]) == ("accepted", 202, call_id)

    caller.peer.send(notify(caller, "SIP/2.0 100 Trying", "active;expires=60"))
    caller.peer.send(notify(caller, "SIP/2.0 200 OK", "terminated;reason=noresource"))
    bye = await caller.expect_request("BYE")  # transferred: Earshot leaves the call
    caller.respond(bye, 200, "OK")
    rows = await results(client, prefix, "t-1", 3)
    assert [(r["outcome"], r["sip_status"]) for r in rows] == [("accepted", 202), ("progress", 100),
                                                                ("transferred", 200)]
    assert all(r["target"] == TARGET and r["action"] == "transfer" for r in rows)
    await wait_until(lambda: not gateway.calls, "the call to end")
    ended = [e for e in await published_events(gateway) if e["type"] == "call.ended"]
    assert [e["reason"] for e in ended] == ["transferred"]


async def test_refused_refer_is_a_failed_transfer_and_the_call_goes_on(make_gateway, open_peer, client, prefix):
    gateway = await make_gateway()
    caller, call_id = await answered_call(gateway, open_peer)
    await client.xadd(f"{prefix}:control", {"data": json.dumps({"command_id": "t-2", "call_id": call_id,
                                                                "action": "transfer", "target": TARGET})})
    refer = await caller.expect_request("REFER")
    caller.respond(refer, 603, "Decline")
    (failed,) = await results(client, prefix, "t-2", 1)
    assert (failed["outcome"], failed["sip_status"]) == ("failed", 603)
    assert caller.to_tag in gateway.calls  # still up


async def test_hangup_sends_bye_once_even_when_the_command_repeats(make_gateway, open_peer, client, prefix):
    gateway = await make_gateway()
    caller, call_id = await answered_call(gateway, open_peer)
    for _ in range(2):
        await client.xadd(f"{prefix}:control", {"command_id": "h-1", "call_id": call_id, "action": "hangup"})
    bye = await caller.expect_request("BYE")
    caller.respond(bye, 200, "OK")
    (done,) = await results(client, prefix, "h-1", 1)
    assert done["outcome"] == "done"
    await wait_until(lambda: not gateway.calls, "the call to end")
    ended = [e for e in await published_events(gateway) if e["type"] == "call.ended"]
    assert [e["reason"] for e in ended] == ["control-hangup"]
    await wait_until(lambda: gateway.control.consumer.duplicates >= 1, "the repeat to be seen")
    rows = [json.loads(f[b"data"]) for _, f in await client.xrange(f"{prefix}:control:results")]
    assert len(rows) == 1


async def test_pause_and_resume_switch_transcription(make_gateway, open_peer, client, prefix):
    gateway = await make_gateway()
    caller, call_id = await answered_call(gateway, open_peer)
    session = gateway.calls[caller.to_tag].session
    await client.xadd(f"{prefix}:control", {"command_id": "p-1", "call_id": call_id, "action": "pause"})
    await results(client, prefix, "p-1", 1)
    assert session.transcription_paused
    await client.xadd(f"{prefix}:control", {"command_id": "p-2", "call_id": call_id, "action": "resume"})
    (done,) = await results(client, prefix, "p-2", 1)
    assert done["outcome"] == "done" and not session.transcription_paused


async def test_bad_commands_are_answered_with_the_field_at_fault(make_gateway, open_peer, client, prefix):
    gateway = await make_gateway()
    _caller, call_id = await answered_call(gateway, open_peer)
    stream = f"{prefix}:control"
    await client.xadd(stream, {"command_id": "b-1", "call_id": call_id, "action": "explode"})
    await client.xadd(stream, {"command_id": "b-2", "call_id": call_id, "action": "transfer", "target": "mailto:x"})
    await client.xadd(stream, {"command_id": "b-3", "call_id": "no-such-call", "action": "hangup"})
    await client.xadd(stream, {"data": "{broken"})
    assert (await results(client, prefix, "b-1", 1))[0]["field"] == "action"
    b2 = (await results(client, prefix, "b-2", 1))[0]
    assert (b2["outcome"], b2["field"]) == ("rejected", "target")
    b3 = (await results(client, prefix, "b-3", 1))[0]
    assert (b3["outcome"], b3["field"]) == ("rejected", "call_id")
    broken = (await results(client, prefix, "", 1))[0]
    assert broken["field"] == "data"
    assert gateway.calls  # nothing happened to the call


@pytest.mark.parametrize(("fields", "field"), [
    ({"call_id": "c", "action": "hangup"}, "command_id"),
    ({"command_id": "x y", "call_id": "c", "action": "hangup"}, "command_id"),
    ({"command_id": "x", "action": "hangup"}, "call_id"),
    ({"command_id": "x", "call_id": "c" * 65, "action": "hangup"}, "call_id"),
    ({"command_id": "x", "call_id": "c", "action": "transfer"}, "target"),
    ({"command_id": "x", "call_id": "c", "action": "transfer", "target": "sip:a@b>\r\nX: 1"}, "target"),
    ({"command_id": "x", "call_id": "c", "action": "hangup", "target": "sip:a@b"}, "target"),
    ({"data": "[1]"}, "data"),
    ({"data": json.dumps({"command_id": 5, "call_id": "c", "action": "hangup"})}, "command_id"),
])
def test_parse_command_names_the_field(fields, field):
    with pytest.raises(CommandError) as info:
        parse_command(fields)
    assert info.value.field == field


def test_parse_command_accepts_plain_and_json_fields():
    plain = parse_command({b"command_id": b"c-1", b"call_id": b"abc", b"action": b"transfer",
                           b"target": b"sips:q@pbx.example;transport=tls"})
    assert (plain.action, plain.target) == ("transfer", "sips:q@pbx.example;transport=tls")
    assert parse_command({"data": json.dumps({"command_id": "c-2", "call_id": "abc", "action": "pause"})}).action \
        == "pause"


async def test_other_gateways_stay_silent_about_calls_they_do_not_hold(make_gateway, open_peer, client, prefix):
    one = await make_gateway()
    two = await make_gateway()
    caller, call_id = await answered_call(one, open_peer)
    await client.xadd(f"{prefix}:control", {"command_id": "m-1", "call_id": call_id, "action": "pause"})
    rows = await results(client, prefix, "m-1", 1)
    await wait_until(lambda: two.control.consumer.handled >= 1, "the second gateway to read the command")
    await asyncio.sleep(0)  # its (silent) handling is complete once counted
    rows = [json.loads(f[b"data"]) for _, f in await client.xrange(f"{prefix}:control:results")]
    assert [(r["outcome"], r["instance"]) for r in rows] == [("done", one.instance_id)]
    assert isinstance(caller, Caller)


# -- pause and resume with real audio: the VAD hears silence while paused -----------------------------

@pytest.fixture
async def stub_gateway(prefix):
    """A gateway whose ASR answers placeholder words at once (gateway/asr/stub.py), so every turn the
    VAD finds becomes a published final."""
    import dataclasses

    from gateway.app import Gateway
    from gateway.asr.stub import StubTranscriber
    from gateway.config import load_settings
    from gateway.dialplan import Dialplan
    from tests.unit.test_gateway_failures import free_rtp_range

    rtp_min, rtp_max = free_rtp_range(2)
    settings = load_settings(environ={
        "EARSHOT_SIP_HOST": "127.0.0.1", "EARSHOT_SIP_TCP": "false", "EARSHOT_HTTP_HOST": "127.0.0.1",
        "EARSHOT_HTTP_PORT": "0", "EARSHOT_RTP_HOST": "127.0.0.1", "EARSHOT_RTP_PORT_MIN": str(rtp_min),
        "EARSHOT_RTP_PORT_MAX": str(rtp_max), "EARSHOT_REDIS_URL": REDIS_URL, "EARSHOT_STREAM_PREFIX": prefix,
        "EARSHOT_PERSIST": "false", "EARSHOT_WEB_ENABLED": "false", "EARSHOT_ASR_PARTIALS": "false",
    })
    gateway = Gateway(dataclasses.replace(settings, sip_port=0), transcriber=StubTranscriber(),
                      dialplan=Dialplan.accept_all())
    await gateway.start()
    yield gateway
    await gateway.close()


async def send_rtp(sock, port: int, payload: bytes, seq: int, ts: int) -> tuple[int, int]:
    """Paced 20 ms PCMU packets to 127.0.0.1:``port``; returns the next (seq, ts)."""
    import struct

    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(0, len(payload) - 159, 160):
        header = struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, ts & 0xFFFFFFFF, 0x1234ABCD)
        sock.sendto(header + payload[i:i + 160], ("127.0.0.1", port))
        seq, ts = seq + 1, ts + 160
        delay = start + (i // 160 + 1) * 0.02 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    return seq, ts


async def test_paused_speech_makes_no_turn_and_resumed_speech_does(stub_gateway, open_peer, client, prefix):
    import socket as sockets

    from tests.fixtures_data import read_g711
    from tests.unit.test_gateway_failures import audio_stream, offer

    gateway = stub_gateway
    rtp = sockets.socket(sockets.AF_INET, sockets.SOCK_DGRAM)
    rtp.bind(("127.0.0.1", 0))
    caller = Caller(await open_peer(gateway))
    response = await caller.invite(offer(port=rtp.getsockname()[1]))
    assert response.status == 200
    port, _ = audio_stream(response.body)
    await wait_until(lambda: caller.to_tag in gateway.calls and gateway.calls[caller.to_tag].session is not None,
                     "the call's session")
    call_id = gateway.calls[caller.to_tag].call_id
    speech, _codec = read_g711("prompt_one-moment-please.wav")
    silence = b"\xff" * 8000  # 1 s of mu-law silence
    try:
        await client.xadd(f"{prefix}:control", {"command_id": "pr-1", "call_id": call_id, "action": "pause"})
        await results(client, prefix, "pr-1", 1)
        seq, ts = await send_rtp(rtp, port, silence[:1600] + speech + silence, 1, 0)
        await client.xadd(f"{prefix}:control", {"command_id": "pr-2", "call_id": call_id, "action": "resume"})
        await results(client, prefix, "pr-2", 1)
        resumed_at = ts // 8
        await send_rtp(rtp, port, speech + silence, seq, ts)

        async def finals():
            events = await published_events(gateway)
            found = [e for e in events if e["type"] == "turn.final" and e["call_id"] == call_id]
            return found or None

        found = await wait_for(finals, 20, "a final of the resumed speech")
        await caller.bye()
        await wait_until(lambda: not gateway.calls, "the call to end")
        found = [e for e in await published_events(gateway) if e["type"] == "turn.final" and e["call_id"] == call_id]
    finally:
        rtp.close()
    assert len(found) == 1, found  # the paused utterance made none
    assert found[0]["start_ms"] >= resumed_at - 400, (found[0], resumed_at)  # the timeline went on while paused
