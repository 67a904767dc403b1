"""End to end: Kamailio (deploy/kamailio/kamailio.cfg, dispatcher module) in front of two
`earshot run` processes; pjsua2 callers play fixture speech through it.

The run, in the order the issue's check names it:
1. four calls go through Kamailio, hashed over Call-ID onto the two gateways;
2. the gateway holding the most of them is drained (SIGTERM) mid-call: it answers OPTIONS and
   new INVITEs 503, Kamailio takes it out of the set, and four new calls go to the survivor;
   the drained gateway's calls still finish and it exits cleanly;
3. every call of 1 and 2 (each on a gateway that stayed alive for it) is transcribed completely;
4. the survivor takes a last pair of calls and is killed with SIGKILL mid-call: those callers
   still end (their BYE times out at Kamailio, no hang), and what was published stays consistent.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from gateway.asr.wer import word_error_rate
from tests.e2e.harness import (
    REDIS_URL,
    ROOT,
    by_call,
    free_udp_tcp_port,
    pcm_wav,
    place_calls,
    read_events,
    start_gateway,
    wait_for_calls_ended,
)
from tests.e2e.test_calls import WER_BOUND, check_call
from tests.fixtures_data import get_entry

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("kamailio") is None,
                       reason="kamailio is not installed (deploy/setup.sh installs Debian's package)"),
]

CONFIG = ROOT / "deploy/kamailio/kamailio.cfg"
NAMES = ["caller_04_outbound_call.wav", "caller_09_random.wav", "caller_11_random.wav", "caller_12_random.wav"]
SHORT = "prompt_cannot-complete-as-dialed.wav"


def options_ping(port: int, timeout: float = 0.5) -> int | None:
    """Status of the answer to an out-of-dialog OPTIONS sent to 127.0.0.1:``port``, None if none came."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        me = s.getsockname()[1]
        tag = uuid.uuid4().hex[:10]
        msg = (f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{tag}\r\n"
               f"Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag={tag}\r\nTo: <sip:127.0.0.1:{port}>\r\n"
               f"Call-ID: {tag}@probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        s.sendto(msg.encode(), ("127.0.0.1", port))
        try:
            data = s.recv(65535)
        except OSError:
            return None
    return int(data.split(b" ", 2)[1])


@pytest.fixture
def kamailio_for(tmp_path):
    """Starts Kamailio on a free port with the deploy config, dispatching to the given SIP ports."""
    procs: list[subprocess.Popen[str]] = []

    def start(sip_ports: list[int]) -> tuple[int, Path]:
        port = free_udp_tcp_port()
        ds_list = tmp_path / "dispatcher.list"
        ds_list.write_text("".join(f"1 sip:127.0.0.1:{p} 0 0 duid=gw{i}\n" for i, p in enumerate(sip_ports)))
        log = tmp_path / "kamailio.log"
        runtime = tmp_path / "run"
        runtime.mkdir()
        cmd = ["kamailio", "-f", str(CONFIG), "-DD", "-E", "-Y", str(runtime), "-P", str(runtime / "k.pid"),
               "-A", f"LISTEN=udp:127.0.0.1:{port}", "-A", f'DS_LIST="{ds_list}"', "-A", "DS_PING_INTERVAL=1",
               "-A", "CHILDREN=2"]
        proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + 15
        while options_ping(port) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kamailio did not start:\n{log.read_text()[-3000:]}")
        return port, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class FakeGateway:
    """A UDP SIP endpoint that answers OPTIONS and INVITE with chosen statuses (changeable live);
    its INVITE answer names it in an X-Gateway header, so the caller sees who answered."""

    def __init__(self, name: str) -> None:
        self.name, self.options, self.invite = name, 200, 486
        self.invites: list[str] = []  # Call-IDs of the INVITEs that reached it
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                continue
            head = data.decode(errors="replace").split("\r\n\r\n", 1)[0].split("\r\n")
            method = head[0].split(" ", 1)[0]
            if method not in ("OPTIONS", "INVITE"):
                continue  # ACK of our final answer
            keep = [line for line in head[1:] if line.split(":", 1)[0].lower() in ("via", "from", "to", "call-id", "cseq")]
            if method == "INVITE":
                self.invites.append(next(line.split(":", 1)[1].strip() for line in keep if line.lower().startswith("call-id")))
            status = self.options if method == "OPTIONS" else self.invite
            keep = [line + (";tag=gw" if line.lower().startswith("to:") else "") for line in keep]
            reply = "\r\n".join([f"SIP/2.0 {status} Test", *keep, f"X-Gateway: {self.name}",
                                  "Retry-After: 5" if status == 503 else "X-Ok: 1", "Content-Length: 0", "", ""])
            self.sock.sendto(reply.encode(), addr)

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


def invite_through(port: int, timeout: float = 8.0) -> tuple[int, str]:
    """One INVITE (fresh Call-ID) through Kamailio: (final status, X-Gateway of the answer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        me = s.getsockname()[1]
        cid = uuid.uuid4().hex
        msg = (f"INVITE sip:agent@127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{cid}\r\n"
               f"Max-Forwards: 70\r\nFrom: <sip:caller@127.0.0.1>;tag={cid[:8]}\r\nTo: <sip:agent@127.0.0.1>\r\n"
               f"Call-ID: {cid}\r\nCSeq: 1 INVITE\r\nContact: <sip:caller@127.0.0.1:{me}>\r\n"
               f"Content-Length: 0\r\n\r\n")
        s.sendto(msg.encode(), ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = s.recv(65535).decode(errors="replace")
            status = int(text.split(" ", 2)[1])
            if status >= 200:
                gw = next((line.split(":", 1)[1].strip() for line in text.split("\r\n")
                           if line.lower().startswith("x-gateway:")), "")
                return status, gw
    raise AssertionError("no final answer")


def test_dispatcher_fails_over_on_503_and_probes_gateways_back(kamailio_for):
    """No Whisper here: two fake gateways pin down the config's routing. A gateway answering
    INVITE 503 (Earshot draining or full) costs no call, the INVITE is retried on the other; one
    failing its OPTIONS probe leaves the set; a healthy probe brings it back."""
    a, b = FakeGateway("a"), FakeGateway("b")
    try:
        port, klog = kamailio_for([a.port, b.port])
        a.invite = 503  # A refuses calls, but still passes its probe
        answers = [invite_through(port) for _ in range(12)]
        assert answers == [(486, "b")] * 12, (answers, klog.read_text()[-3000:])
        assert a.invites, "hashing never picked gateway a: nothing was tested"
        refused = len(a.invites)
        # the 503 took A out of the set: later INVITEs go straight to B, until A's probe passes
        # again (ds_ping_interval 1 s in this test) and A, healthy now, takes its share again
        a.invite = 486
        time.sleep(2.5)
        answers = [invite_through(port) for _ in range(12)]
        assert {gw for _, gw in answers} == {"a", "b"}, answers
        back = sum(gw == "a" for _, gw in answers)
        # A fails its OPTIONS probe (as a draining Earshot does): out of the set, no INVITE reaches it
        a.options = 503
        time.sleep(2.5)
        before = len(a.invites)
        answers = [invite_through(port) for _ in range(12)]
        assert answers == [(486, "b")] * 12 and len(a.invites) == before, answers
        print(f"kamailio dispatcher: {refused} INVITE refused by a (503) and answered by b, 12 of 12 calls "
              f"answered; a back after a good probe: {back} of 12; a failing its probe: 0 of 12 sent to it")
    finally:
        a.close()
        b.close()


def started_calls(stream: str) -> set[str]:
    return {e["sip_call_id"] for e in read_events(stream) if e["type"] == "call.started"}


def wait_started(gw, before: set[str], count: int, klog: Path) -> list[dict]:
    """The call.started events of ``count`` calls on ``gw`` that are not in ``before``."""
    deadline = time.monotonic() + 20
    while True:
        new = [e for e in read_events(gw.events_stream) if e["type"] == "call.started" and e["sip_call_id"] not in before]
        if len(new) >= count:
            return new
        assert time.monotonic() < deadline, klog.read_text()[-3000:]
        time.sleep(0.1)


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["results"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised by the test
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def joined(thread: threading.Thread, out: dict, timeout: float) -> list[dict]:
    thread.join(timeout)
    assert not thread.is_alive(), "callers hung"
    if "error" in out:
        raise out["error"]
    return out["results"]


def test_calls_through_kamailio_survive_a_drain_and_a_kill(kamailio_for, tmp_path):
    base = 30000 + (os.getpid() % 100) * 200
    envs = [{"EARSHOT_RTP_PORT_MIN": str(base + i * 100), "EARSHOT_RTP_PORT_MAX": str(base + i * 100 + 98),
             "EARSHOT_DRAIN_TIMEOUT_S": "60", "EARSHOT_RETRY_AFTER_S": "5",
             "EARSHOT_INSTANCE_ID": f"kam-gw{i}",
             "EARSHOT_PUBLISH_SPOOL_FILE": os.path.join(tempfile.gettempdir(), f"earshot-kam-{uuid.uuid4().hex}.spool")}
            for i in range(2)]
    gateways: list = [None, None]

    def start(i: int) -> None:
        gateways[i] = start_gateway(envs[i])
    starters = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in starters:
        t.start()
    for t in starters:
        t.join(180)
    try:
        assert all(gateways), "a gateway did not start"
        port, klog = kamailio_for([g.sip_port for g in gateways])
        target = f"127.0.0.1:{port}"
        entries = [get_entry(n) for n in NAMES]
        wavs = [pcm_wav(e.file, tmp_path) for e in entries]
        by_wav = {str(w): e for w, e in zip(wavs, entries)}

        # 1. four calls, spread by Call-ID hash
        first_thread, first_out = in_thread(place_calls, target, wavs, 4, hold=1.0, timeout=90)
        deadline = time.monotonic() + 30
        while sum(len(started_calls(g.events_stream)) for g in gateways) < 4:
            assert time.monotonic() < deadline, klog.read_text()[-3000:]
            time.sleep(0.2)
        counts = [len(started_calls(g.events_stream)) for g in gateways]
        drained, survivor = (gateways[0], gateways[1]) if counts[0] >= counts[1] else (gateways[1], gateways[0])

        # 2. drain one mid-call; new calls must go to the other
        drained.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while options_ping(drained.sip_port) != 503:  # what takes it out of Kamailio's set
            assert time.monotonic() < deadline, drained.log()
        time.sleep(1.5)  # at least one probe interval (1 s here)
        second = place_calls(target, wavs, 4, hold=1.0, timeout=90)
        first = joined(first_thread, first_out, 120)
        results = first + second
        assert all(r["confirmed"] for r in results), results
        second_ids = {r["call_id"] for r in second}
        drained_ids = started_calls(drained.events_stream)
        assert not second_ids & drained_ids, "a new call went to the draining gateway"
        assert drained.proc.wait(90) == 0, drained.log()

        # 3. every call of 1 and 2 transcribed completely on the gateway that took it
        all_ids = {r["call_id"] for r in results}
        events = {**by_call(wait_for_calls_ended(drained.events_stream, drained_ids, timeout=30)),
                  **by_call(wait_for_calls_ended(survivor.events_stream, all_ids - drained_ids, timeout=60))}
        assert all_ids <= set(events), (all_ids - set(events), survivor.log())
        assert second_ids <= started_calls(survivor.events_stream)
        wers = []
        for result in results:
            entry = by_wav[result["wav"]]
            mine = events[result["call_id"]]
            text = check_call(mine, expect_partials=False)
            wer = word_error_rate(entry.text, text)
            assert wer <= WER_BOUND, (result, wer, text)
            assert mine[-1]["reason"] == "bye", mine[-1]
            wers.append(wer)
        print(f"kamailio e2e: phase-1 split {counts}, drained gateway took {len(drained_ids)} calls, "
              f"survivor {len(all_ids - drained_ids)}; mean WER {sum(wers) / len(wers):.3f}")

        # 4. the survivor hangs one call up itself (its BYE goes to Kamailio with a Route header and
        # on to the caller), takes two more and is killed mid-call: those callers still end
        short = pcm_wav(SHORT, tmp_path)
        before = started_calls(survivor.events_stream)
        hung_thread, hung_out = in_thread(place_calls, target, [short], 1, hold=30.0, timeout=60)
        hung_call = wait_started(survivor, before, 1, klog)[0]
        before |= {hung_call["sip_call_id"]}
        last_thread, last_out = in_thread(place_calls, target, [short], 2, hold=3.0, timeout=40)
        wait_started(survivor, before, 2, klog)
        client = redis.Redis.from_url(REDIS_URL)
        client.xadd(f"{survivor.prefix}:control", {"command_id": f"kam-{uuid.uuid4().hex[:8]}",
                                                   "call_id": hung_call["call_id"], "action": "hangup"})
        client.close()
        ended = wait_for_calls_ended(survivor.events_stream, {hung_call["sip_call_id"]}, timeout=15)
        assert by_call(ended)[hung_call["sip_call_id"]][-1]["reason"] == "control-hangup"
        # the caller got Earshot's BYE through Kamailio: it ends long before its own 30 s hangup
        hung = joined(hung_thread, hung_out, 15)
        survivor.proc.kill()
        survivor.proc.wait()
        last = joined(last_thread, last_out, 60)
        assert hung[0]["confirmed"] and all(r["confirmed"] for r in last), (hung, last)
        assert hung[0]["disconnect_reason"] == "Normal call clearing", hung  # PJSIP's words for a BYE it got
        killed = by_call(read_events(survivor.events_stream))
        for result in last:
            mine = killed[result["call_id"]]
            numbers = [int(e["event_id"].rsplit(":", 1)[1]) for e in mine]
            assert numbers == list(range(1, len(mine) + 1)), numbers  # nothing lost or doubled before the kill
            assert "call.ended" not in [e["type"] for e in mine]
        print(f"kamailio e2e: Earshot's BYE reached the caller via Kamailio {hung[0]['disconnect_reason']!r}; "
              f"the killed gateway's {len(last)} calls ended at the callers: "
              f"{[(r['status'], r['disconnect_reason']) for r in last]}")
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for gw in gateways:
            if gw is None:
                continue
            if gw.proc.poll() is None:
                gw.proc.kill()
                gw.proc.wait()
            keys = list(client.scan_iter(match=f"{gw.prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
        client.close()
        for env in envs:
            Path(env["EARSHOT_PUBLISH_SPOOL_FILE"]).unlink(missing_ok=True)
