"""Routing end to end: a caller says a fixture phrase, the routing example decides, Earshot transfers.

`earshot run` runs as its own process (Whisper tiny.en, the machine's Redis). A PJSIP
caller (tests/e2e/pjsua_caller.py --follow-transfer) plays "Password incorrect. Please
enter your password followed by the pound key." The example routing consumer
(examples/routing.py, its real handler in a consumer group here) hears "password" in the
caller's first turn and decides the accounts queue; Earshot answered the call itself
(source sip), so the consumer sends a transfer command to the call-control stream.
Earshot REFERs the caller (RFC 3515); PJSIP accepts (202), calls the target, a sipp UAS
(`sipp -sn uas`, standing in for the queue) answers, PJSIP's NOTIFYs report 100 then
200, and Earshot publishes the outcome (accepted, progress, transferred) and leaves the
call with BYE (call.ended reason transferred).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from examples.routing import PRODUCER, Router, load_rules
from gateway.consumer import ConsumerEvent, StreamConsumer, StreamWriter
from tests.e2e.harness import REDIS_URL, free_udp_tcp_port, pcm_wav, place_calls, read_events, \
    running_gateway

pytestmark = [pytest.mark.e2e]

FIXTURE = "prompt_auth-incorrect.wav"  # "Password incorrect. Please enter your password followed by the pound key."
SIPP = shutil.which("sipp")


@pytest.fixture
def queue(tmp_path):
    """A sipp UAS standing in for the queue: answers one call, exits 0 once its BYE is done."""
    if SIPP is None:
        pytest.skip("sipp is not installed (deploy/setup.sh installs sip-tester)")
    port = free_udp_tcp_port()
    proc = subprocess.Popen([SIPP, "-sn", "uas", "-i", "127.0.0.1", "-p", str(port), "-m", "1", "-nostdin",
                             "-timeout", "120", "-trace_err", "-timeout_error"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield port, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


async def test_caller_is_routed_by_what_they_say_and_transferred_to_the_queue(tmp_path, queue):
    port, sipp = queue
    target = f"sip:accounts@127.0.0.1:{port}"
    rules = tmp_path / "routing.yaml"
    rules.write_text(Path("examples/routing.yaml").read_text().replace("127.0.0.1:5090", f"127.0.0.1:{port}"))
    wav = pcm_wav(FIXTURE, tmp_path)
    with running_gateway({"EARSHOT_DATABASE_URL": f"sqlite:///{tmp_path / 'earshot.db'}",
                          "EARSHOT_PERSIST": "false"}) as gw:
        client = aioredis.Redis.from_url(REDIS_URL)
        router = Router(load_rules(rules), StreamWriter(client, f"{gw.prefix}:routing", PRODUCER), client,
                        f"{gw.prefix}:control")
        consumer = StreamConsumer(client, stream=gw.events_stream, group="routing", consumer="e2e", start="0",
                                  block_ms=200)
        running = asyncio.create_task(consumer.run(router))
        try:
            # the caller stays up long after its audio: only the transfer ends its call with Earshot
            results = await asyncio.to_thread(place_calls, f"127.0.0.1:{gw.sip_port}", [wav], 1, hold=60,
                                              timeout=100, caller_args=("--follow-transfer", "--transfer-hold", "1"))
        finally:
            consumer.stop()
            await asyncio.wait_for(running, 10)
        decisions = [ConsumerEvent.from_fields(f) for _, f in await client.xrange(f"{gw.prefix}:routing")]
        outcome = [json.loads(f[b"data"]) for _, f in await client.xrange(f"{gw.prefix}:control:results")]
        await client.aclose()
        events = read_events(gw.events_stream)
    (result,) = results
    assert result["confirmed"], result
    (decision,) = decisions
    assert (decision.data["rule"], decision.data["destination"], decision.data["matched"], decision.data["transfer"]) \
        == ("accounts", target, "password", True), decision
    calls: dict[str, list[dict]] = {}
    for event in events:
        calls.setdefault(event["call_id"], []).append(event)
    (call_id,) = calls
    assert decision.call_id == call_id
    finals = [e for e in calls[call_id] if e["type"] == "turn.final"]
    assert "password" in finals[0]["text"].lower(), finals
    assert [(r["outcome"], r["sip_status"]) for r in outcome if r["outcome"] != "progress"] == \
        [("accepted", 202), ("transferred", 200)], outcome
    assert all(r["command_id"] == f"route-{call_id}" and r["target"] == target for r in outcome)
    assert calls[call_id][-1]["type"] == "call.ended" and calls[call_id][-1]["reason"] == "transferred"
    # the caller followed the REFER to the queue, which answered
    transfer = result["transfer"]
    assert transfer and transfer["target"].strip("<>") == target, result
    assert transfer["confirmed"] and transfer["call_id"] != result["call_id"], result  # a new call, answered
    assert sipp.wait(30) == 0, sipp.stderr.read() if sipp.stderr else ""
