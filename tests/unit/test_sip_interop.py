"""Interop with a real SIP client: sipp calls a SipEndpoint on 127.0.0.1.

sipp checks every message it receives against its scenario and exits
non-zero on anything unexpected (wrong status, missing To tag, a BYE it
cannot match to its dialog...), so these runs validate our wire format and
routing with an independent implementation.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from gateway.sip.events import CallConfirmed, CallEnded, Event, IncomingCall
from gateway.sip.transport import SipEndpoint
from gateway.sip.useragent import UserAgent

pytestmark = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp not installed")

ANSWER = (
    b"v=0\r\no=earshot 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0\r\na=recvonly\r\n"
)

# sipp places a call and waits for *our* BYE.
CALLEE_HANGS_UP = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="caller; the callee hangs up">
  <send retrans="500">
    <![CDATA[
      INVITE sip:earshot@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:earshot@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:sipp@[local_ip]:[local_port];transport=[transport]>
      Record-Route: <sip:[local_ip]:[local_port];transport=[transport];lr>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 8 0
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="200" rrs="true"/>
  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:earshot@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv request="BYE"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
</scenario>
"""


async def run_sipp(port: int, transport: str, scenario: list[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "sipp", *scenario, f"127.0.0.1:{port}", "-t", transport, "-i", "127.0.0.1", "-p", "0",
        "-m", "1", "-l", "1", "-d", "100", "-timeout", "20", "-nostdin",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, (out + err).decode(errors="replace")[-2000:]


async def serve(hang_up: bool) -> tuple[SipEndpoint, list[Event]]:
    ua = UserAgent(local_host="127.0.0.1", local_port=0)
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        now = asyncio.get_running_loop().time()
        if isinstance(event, IncomingCall):
            ua.answer(event.dialog_id, ANSWER, now)
        elif isinstance(event, CallConfirmed) and hang_up:
            ua.hangup(event.dialog_id, now)
        endpoint.flush()

    endpoint = SipEndpoint(ua, on_event)
    await endpoint.start("127.0.0.1", 0)
    ua.local_port = endpoint.udp_port
    return endpoint, events


@pytest.mark.parametrize("transport", ["u1", "t1"])
async def test_sipp_calls_and_hangs_up(transport: str) -> None:
    endpoint, events = await serve(hang_up=False)
    try:
        rc, output = await run_sipp(endpoint.udp_port, transport, ["-sn", "uac"])
    finally:
        await endpoint.close()
    assert rc == 0, output
    assert [type(e).__name__ for e in events] == ["IncomingCall", "CallConfirmed", "CallEnded"]
    assert isinstance(events[-1], CallEnded) and events[-1].reason == "bye"


@pytest.mark.parametrize("transport", ["u1", "t1"])
async def test_sipp_receives_our_bye(transport: str, tmp_path: Path) -> None:
    scenario = tmp_path / "callee_hangs_up.xml"
    scenario.write_text(CALLEE_HANGS_UP)
    endpoint, events = await serve(hang_up=True)
    try:
        rc, output = await run_sipp(endpoint.udp_port, transport, ["-sf", str(scenario)])
        for _ in range(100):  # sipp exits right after its 200; let it reach us
            if any(isinstance(e, CallEnded) for e in events):
                break
            await asyncio.sleep(0.05)
    finally:
        await endpoint.close()
    assert rc == 0, output
    assert [type(e).__name__ for e in events] == ["IncomingCall", "CallConfirmed", "CallEnded"]
    assert isinstance(events[-1], CallEnded) and events[-1].reason == "local-bye"
