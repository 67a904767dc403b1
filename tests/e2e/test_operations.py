"""What operators rely on, through real processes: the call limit answers 503 with
Retry-After, SIGTERM drains (new calls refused, active ones finish and are
transcribed), SIGTERM with Redis down still exits cleanly, and a caller that sends
no RTP is hung up on after media_timeout_s."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from gateway.asr.wer import word_error_rate
from gateway.sip.message import NameAddress, SipRequest, SipResponse, parse_cseq, parse_message
from tests.e2e.harness import by_call, pcm_wav, place_calls, read_events, start_gateway, wait_for_calls_ended
from tests.fixtures_data import get_entry
from tests.redis_server import free_media_ports, free_port

pytestmark = [pytest.mark.e2e]

HERE = Path(__file__).resolve().parent
G711_OFFER = (b"v=0\r\no=pbx 4242 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
              b"m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n")


class RawCaller:
    """A SIP peer on a plain UDP socket, for checking what the gateway puts on the wire
    (the pjsua caller reports a status code, not headers). Requests are written out by
    hand (RFC 3261 8.1.1); one call per caller."""

    def __init__(self, gateway_port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.gateway = ("127.0.0.1", gateway_port)
        self.inbox: list[SipRequest | SipResponse] = []
        self.call_id = f"{uuid.uuid4().hex}@127.0.0.1"
        self.from_tag = uuid.uuid4().hex[:10]
        self.to_tag: str | None = None
        self.remote_target = f"sip:1000@127.0.0.1:{self.gateway[1]}"
        self.cseq = 0

    def _request(self, method: str, cseq: int, branch: str, body: bytes = b"", uri: str | None = None,
                 to_tag: str | None = None) -> bytes:
        to_tag = to_tag or self.to_tag
        lines = [
            f"{method} {uri or self.remote_target} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:pbx@127.0.0.1>;tag={self.from_tag}",
            f"To: <sip:1000@127.0.0.1:{self.gateway[1]}>" + (f";tag={to_tag}" if to_tag else ""),
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:pbx@127.0.0.1:{self.port}>",
        ]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def expect(self, predicate, what: str, timeout: float = 10.0) -> SipRequest | SipResponse:
        deadline = time.monotonic() + timeout
        while True:
            for message in self.inbox:
                if predicate(message):
                    self.inbox.remove(message)
                    return message
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {what} within {timeout} s"
            self.sock.settimeout(remaining)
            try:
                self.inbox.append(parse_message(self.sock.recv(65536)))
            except socket.timeout:
                pass

    def _final(self, cseq: int, method: str) -> SipResponse:
        response = self.expect(
            lambda m: isinstance(m, SipResponse) and m.status >= 200 and m.headers.get("call-id") == self.call_id
            and parse_cseq(m.headers.get("cseq") or "") == (cseq, method), f"final response to {method}")
        assert isinstance(response, SipResponse)
        return response

    def invite(self, body: bytes = G711_OFFER) -> SipResponse:
        """INVITE and its ACK (2xx: a new transaction to the Contact; else the INVITE's branch)."""
        self.cseq += 1
        branch = "z9hG4bK" + uuid.uuid4().hex[:16]
        uri = self.remote_target
        self.sock.sendto(self._request("INVITE", self.cseq, branch, body), self.gateway)
        response = self._final(self.cseq, "INVITE")
        tag = NameAddress.parse(response.headers.get("to") or "", "To").tag
        if response.status < 300:
            self.to_tag = tag
            self.remote_target = NameAddress.parse(response.headers.get("contact") or "", "Contact").uri
            self.sock.sendto(self._request("ACK", self.cseq, "z9hG4bK" + uuid.uuid4().hex[:16]), self.gateway)
        else:
            self.sock.sendto(self._request("ACK", self.cseq, branch, uri=uri, to_tag=tag), self.gateway)
        return response

    def bye(self) -> SipResponse:
        self.cseq += 1
        self.sock.sendto(self._request("BYE", self.cseq, "z9hG4bK" + uuid.uuid4().hex[:16]), self.gateway)
        return self._final(self.cseq, "BYE")

    def answer_bye(self, timeout: float) -> SipRequest:
        """Wait for the gateway's BYE in this dialog and answer it 200 (RFC 3261 8.2.6)."""
        bye = self.expect(lambda m: isinstance(m, SipRequest) and m.method == "BYE"
                          and m.headers.get("call-id") == self.call_id, "BYE from the gateway", timeout)
        assert isinstance(bye, SipRequest)
        h = bye.headers
        lines = ["SIP/2.0 200 OK", *(f"Via: {v}" for v in h.raw("via")), f"From: {h.get('from')}",
                 f"To: {h.get('to')}", f"Call-ID: {h.get('call-id')}", f"CSeq: {h.get('cseq')}", "Content-Length: 0"]
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), self.gateway)
        return bye

    def close(self) -> None:
        self.sock.close()


def test_call_limit_answers_503_with_retry_after(tmp_path):
    gw = start_gateway({"EARSHOT_MAX_CALLS": "1", "EARSHOT_RETRY_AFTER_S": "7", "EARSHOT_MEDIA_TIMEOUT_S": "120"})
    first, second = RawCaller(gw.sip_port), RawCaller(gw.sip_port)
    try:
        assert first.invite().status == 200  # takes the only slot
        # a real SIP stack is refused with 503...
        wav = pcm_wav("prompt_tt-weasels.wav", tmp_path)
        results = place_calls(f"127.0.0.1:{gw.sip_port}", [wav], 1, hold=0.5)
        assert [(r["status"], r["confirmed"]) for r in results] == [(503, False)], results
        # ...and the 503 on the wire carries the configured Retry-After (pjsua reports no headers)
        refused = second.invite()
        assert (refused.status, refused.reason) == (503, "Service Unavailable - Call Limit Reached")
        assert refused.headers.get_all("retry-after") == ["7"], refused.headers
        assert first.bye().status == 200
        events = wait_for_calls_ended(gw.events_stream, {first.call_id}, timeout=30)
        assert {e["sip_call_id"] for e in events} == {first.call_id}  # the refused calls left no trace
    finally:
        first.close()
        second.close()
        assert gw.stop() == 0, gw.log()


def test_sigterm_drains_active_calls_and_refuses_new_ones(tmp_path):
    gw = start_gateway({"EARSHOT_DRAIN_TIMEOUT_S": "60"})
    entry = get_entry("caller_04_outbound_call.wav")  # A-law, 16 s, 5 turns
    wav = pcm_wav(entry.file, tmp_path)
    first: list[dict] = []
    caller = threading.Thread(target=lambda: first.extend(
        place_calls(f"127.0.0.1:{gw.sip_port}", [wav], 1, hold=1.0)))
    caller.start()
    try:
        deadline = time.monotonic() + 20
        while not any(e["type"] == "call.started" for e in read_events(gw.events_stream)):
            assert time.monotonic() < deadline, gw.log()
            time.sleep(0.2)
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        late = place_calls(f"127.0.0.1:{gw.sip_port}", [pcm_wav("prompt_tt-weasels.wav", tmp_path)], 1)
        assert late[0]["status"] == 503 and not late[0]["confirmed"], late
        assert gw.proc.poll() is None  # still serving the active call
        caller.join(60)
        assert first and first[0]["confirmed"], first
        assert gw.proc.wait(30) == 0, gw.log()  # exits by itself once the call ended
    finally:
        gw.stop()
        caller.join(5)
    mine = by_call(read_events(gw.events_stream))[first[0]["call_id"]]
    assert mine[-1]["type"] == "call.ended" and mine[-1]["reason"] == "bye"
    text = " ".join(e["text"] for e in mine if e["type"] == "turn.final")
    assert word_error_rate(entry.text, text) <= 0.25, text


@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (Debian's sip-tester) is not installed")
def test_no_rtp_for_media_timeout_gets_a_bye(tmp_path):
    gw = start_gateway({"EARSHOT_MEDIA_TIMEOUT_S": "2"})
    try:
        started = time.monotonic()
        done = subprocess.run(
            ["sipp", f"127.0.0.1:{gw.sip_port}", "-sf", str(HERE / "sipp/uac_silent_until_bye.xml"),
             "-s", "1000", "-i", "127.0.0.1", "-p", str(free_port()), "-mp", str(free_media_ports()), "-m", "1",
             "-timeout", "40s", "-timeout_error", "-nostdin", "-aa",
             "-trace_err", "-error_file", str(tmp_path / "errors.log")],
            capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
        errors = (tmp_path / "errors.log").read_text() if (tmp_path / "errors.log").exists() else ""
        assert done.returncode == 0, (done.returncode, errors, gw.log())
        assert 2.0 <= elapsed < 15, elapsed
        events = read_events(gw.events_stream)
        assert [e["type"] for e in events] == ["call.started", "call.ended"]
        assert events[-1]["reason"] == "media-timeout"
        assert events[-1]["rtp"]["packets"] == 0
    finally:
        assert gw.stop() == 0


def test_sigterm_with_redis_down_exits_cleanly_and_says_what_was_not_published():
    """Redis unreachable the whole time: a call still works, SIGTERM drains it (BYE after
    drain_timeout_s), the publisher waits up to 10 s to flush and then logs how many events
    it could not publish, and the process exits 0 instead of hanging."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    gw = start_gateway({"EARSHOT_REDIS_URL": dead_redis, "EARSHOT_PERSIST": "false", "EARSHOT_ASR_MODEL": "none",
                        "EARSHOT_DRAIN_TIMEOUT_S": "2", "EARSHOT_MEDIA_TIMEOUT_S": "120"})
    caller = RawCaller(gw.sip_port)
    try:
        assert caller.invite().status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/healthz", timeout=10) as response:
            health = json.loads(response.read())
        assert (health["status"], health["redis"], health["active_calls"]) == ("ok", "unreachable", 1), health
        assert health["publish_backlog"] == 1, health  # call.started, waiting for Redis
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        caller.answer_bye(timeout=2 + 10)  # the drain's BYE (reason shutdown) once drain_timeout_s is over
        rc = gw.proc.wait(30)
        elapsed = time.monotonic() - started
    finally:
        caller.close()
        gw.stop()
    log = gw.log()
    assert rc == 0, log
    assert elapsed < 30, (elapsed, log)
    # call.started and call.ended were never published: the log says so, with the count
    assert "closing with 2 events not yet published to Redis" in log, log
    assert "earshot: stopped" in log, log
