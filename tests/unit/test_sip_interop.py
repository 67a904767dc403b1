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


# -- PJSIP: hold and resume (re-INVITEs from a real stack) ---------------------

PJSUA_HOLD_SCRIPT = r'''
import json, re, sys, time
import pjsua2 as pj

target, transport = sys.argv[1], sys.argv[2]
ep = pj.Endpoint()
ep.libCreate()
cfg = pj.EpConfig()
cfg.uaConfig.threadCnt = 0
cfg.uaConfig.mainThreadOnly = True
cfg.logConfig.level = 0
cfg.logConfig.consoleLevel = 0
ep.libInit(cfg)
tcfg = pj.TransportConfig()
tcfg.port = 0
ep.transportCreate(pj.PJSIP_TRANSPORT_TCP if transport == "tcp" else pj.PJSIP_TRANSPORT_UDP, tcfg)
ep.libStart()
ep.audDevManager().setNullDev()
stages = []
answers = []  # the a= direction of each 200 OK to an INVITE, as received (the gateway's answers)
DIRECTION = re.compile(r"^a=(sendrecv|sendonly|recvonly|inactive)\s*$", re.MULTILINE)

class Call(pj.Call):
    def onCallTsxState(self, prm):
        if prm.e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        tsx_state = prm.e.body.tsxState
        tsx = tsx_state.tsx
        if tsx_state.type == pj.PJSIP_EVENT_RX_MSG and tsx.method == "INVITE" and tsx.statusCode == 200:
            found = DIRECTION.findall(tsx_state.src.rdata.wholeMsg)
            answers.append(found[-1] if found else "sendrecv")

    def onCallState(self, prm):
        info = self.getInfo()
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED:
            stages.append("confirmed")
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            stages.append("disconnected")

    def onCallMediaState(self, prm):
        # Our answers are recvonly (we only listen), which PJSIP reports as
        # REMOTE_HOLD while it keeps sending: that is the "active" state here.
        names = {pj.PJSUA_CALL_MEDIA_REMOTE_HOLD: "active", pj.PJSUA_CALL_MEDIA_ACTIVE: "active",
                 pj.PJSUA_CALL_MEDIA_LOCAL_HOLD: "held"}
        info = self.getInfo()  # keep it alive: .media points into it
        for media in info.media:
            if media.type == pj.PJMEDIA_TYPE_AUDIO:
                stages.append(names.get(media.status, str(media.status)))

account = pj.Account()
acfg = pj.AccountConfig()
acfg.idUri = "sip:pjsua@127.0.0.1"
account.create(acfg)
call = Call(account)
suffix = ";transport=tcp" if transport == "tcp" else ""
call.makeCall(f"sip:earshot@{target}{suffix}", pj.CallOpParam(True))
deadline = time.monotonic() + 15
step = 0
while time.monotonic() < deadline and "disconnected" not in stages:
    ep.libHandleEvents(10)
    if step == 0 and "active" in stages:
        call.setHold(pj.CallOpParam(True)); step = 1
    elif step == 1 and "held" in stages:
        prm = pj.CallOpParam(True)
        prm.opt.flag = pj.PJSUA_CALL_UNHOLD
        call.reinvite(prm); step = 2
    elif step == 2 and stages.count("active") >= 2:
        call.hangup(pj.CallOpParam(True)); step = 3
print(json.dumps({"stages": stages, "answers": answers}), flush=True)
del call
ep.libDestroy()
'''


def _has_pjsua2() -> bool:
    try:
        import pjsua2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_pjsua2(), reason="pjsua2 not installed")
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_pjsua2_hold_and_resume(transport: str, tmp_path: Path, prefix: str) -> None:
    """PJSIP holds (a=sendonly) and resumes (a=sendrecv) a call to a real Gateway: the
    assertions are on what the gateway did, its answers' direction as PJSIP received
    them and the call's on_hold state, not on what PJSIP itself sent."""
    import dataclasses
    import json
    import sys

    from gateway.app import Gateway
    from gateway.asr.media_only import MediaOnlyTranscriber
    from gateway.config import load_settings
    from gateway.dialplan import Dialplan
    from gateway.sip.events import ReInvite, SessionRefreshed
    from tests.conftest import REDIS_URL
    from tests.unit.test_gateway_failures import free_rtp_range

    rtp_min, rtp_max = free_rtp_range(2)
    settings = load_settings(environ={
        "EARSHOT_SIP_HOST": "127.0.0.1", "EARSHOT_HTTP_HOST": "127.0.0.1", "EARSHOT_HTTP_PORT": "0",
        "EARSHOT_RTP_HOST": "127.0.0.1", "EARSHOT_RTP_PORT_MIN": str(rtp_min),
        "EARSHOT_RTP_PORT_MAX": str(rtp_max), "EARSHOT_REDIS_URL": REDIS_URL, "EARSHOT_STREAM_PREFIX": prefix,
        "EARSHOT_PERSIST": "false", "EARSHOT_WEB_ENABLED": "false",
    })
    gateway = Gateway(dataclasses.replace(settings, sip_port=0), transcriber=MediaOnlyTranscriber(),
                      dialplan=Dialplan.accept_all())
    events: list[Event] = []
    holds: list[bool] = []  # the call's on_hold once the gateway handled the ACK, then each re-INVITE
    handle = gateway.sip.on_event

    def observe(event: Event) -> None:
        handle(event)  # the gateway's own handler; re-INVITEs are decided synchronously in it
        events.append(event)
        if isinstance(event, (CallConfirmed, ReInvite)):
            holds.append(gateway.calls[event.dialog_id].on_hold)

    gateway.sip.on_event = observe
    script = tmp_path / "pjsua_hold.py"
    script.write_text(PJSUA_HOLD_SCRIPT)
    await gateway.start()
    proc = None
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), f"127.0.0.1:{gateway.sip_port}", transport,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 40)
        deadline = asyncio.get_running_loop().time() + 5
        while gateway.calls and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert not gateway.calls, "the call did not end in the gateway"
    finally:
        if proc is not None and proc.returncode is None:  # PJSIP stuck: never leave it running
            proc.kill()
            await proc.wait()
        await gateway.close()
    assert proc.returncode == 0, err.decode()[-2000:]
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen["stages"] == ["active", "confirmed", "held", "active", "disconnected"], seen
    # the gateway's 200s to the INVITE, the hold and the resume: it only listens, always recvonly
    assert seen["answers"] == ["recvonly", "recvonly", "recvonly"], seen
    # PJSIP asks for session timers (RFC 4028), so each INVITE also refreshes the session
    kinds = [type(e).__name__ for e in events if not isinstance(e, SessionRefreshed)]
    assert kinds == ["IncomingCall", "CallConfirmed", "ReInvite", "ReInvite", "CallEnded"], kinds
    assert holds == [False, True, False]
    assert isinstance(events[-1], CallEnded) and events[-1].reason == "bye"
