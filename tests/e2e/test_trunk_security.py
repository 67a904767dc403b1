"""End to end: trunks, digest authentication and floods against `earshot run` over loopback.

Loopback holds all of 127.0.0.0/8, so sources are told apart by address: PJSIP calls from
127.0.0.2 (trunk `secure`, digest 401) and 127.0.0.3 (trunk `proxy`, digest 407) and 127.0.0.4 (trunk `legacy`, MD5 only: PJSIP
takes the first challenge it knows, SHA-256, when both are offered); the rest of
127.0.0.0/24 is trunk `lab` (no auth); 127.0.1.1 is in no trunk. sip_loopback_verified is off,
so every UDP source is unverified until it authenticates or ACKs, as on a real network.
"""

from __future__ import annotations

import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.asr.wer import word_error_rate
from tests.e2e.harness import by_call, pcm_wav, place_calls, read_events, running_gateway, wait_for_calls_ended
from tests.e2e.test_calls import WER_BOUND, check_call
from tests.fixtures_data import get_entry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_CALLS = 4
CONFIG = """\
max_calls: 4
drain_timeout_s: 1
sip_loopback_verified: false
trunks:
  - name: secure
    networks: [127.0.0.2/32]
    auth: {username: pbx, password: s3cret, algorithms: [SHA-256, MD5]}
  - name: legacy
    networks: [127.0.0.4/32]
    auth: {username: pbx, password: s3cret, algorithms: [MD5]}
  - name: proxy
    networks: [127.0.0.3/32]
    auth: {username: pbx, password: s3cret, challenge: 407}
  - name: lab
    networks: [127.0.0.0/24]
"""
SDP = (b"v=0\r\no=flood 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    config = tmp_path_factory.mktemp("trunks") / "earshot.yaml"
    config.write_text(CONFIG)
    with running_gateway({"EARSHOT_CONFIG": str(config)}, check_exit=False) as gw:
        yield gw


def invite(source: str, port: int, target_port: int) -> bytes:
    call_id = uuid.uuid4().hex
    lines = [
        f"INVITE sip:1000@127.0.0.1:{target_port} SIP/2.0",
        f"Via: SIP/2.0/UDP {source}:{port};branch=z9hG4bK{call_id[:16]};rport",
        "Max-Forwards: 70",
        f"From: <sip:flood@{source}>;tag={call_id[:8]}",
        f"To: <sip:1000@127.0.0.1:{target_port}>",
        f"Call-ID: {call_id}",
        "CSeq: 1 INVITE",
        f"Contact: <sip:flood@{source}:{port}>",
        "Content-Type: application/sdp",
        f"Content-Length: {len(SDP)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + SDP


def sockets(sources: list[str]) -> list[socket.socket]:
    out = []
    for source in sources:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.settimeout(0.05)
        out.append(sock)
    return out


def drain(socks: list[socket.socket], seconds: float) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sock in socks:
            try:
                while True:
                    got.append(sock.recv(65536))
            except (socket.timeout, BlockingIOError):
                pass
    return got


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def auth_args(algorithm: str, password: str = "s3cret", bind: str = "127.0.0.2") -> tuple[str, ...]:
    return ("--auth-user", "pbx", "--auth-password", password, "--auth-algorithm", algorithm, "--bind", bind)


def transcribed(gw, sip_call_id: str, entry) -> list[dict]:
    events = wait_for_calls_ended(gw.events_stream, {sip_call_id}, timeout=90)
    mine = by_call(events).get(sip_call_id)
    assert mine, f"no events for {sip_call_id}:\n{gw.log()}"
    text = check_call(mine, expect_partials=False)
    assert word_error_rate(entry.text, text) <= WER_BOUND, text
    return mine


def test_digest_calls_md5_and_sha256_transcribed_end_to_end(gateway, tmp_path):
    entry = get_entry("caller_03_greetings.wav")
    wav = pcm_wav(entry.file, tmp_path)
    target = f"127.0.0.1:{gateway.sip_port}"
    sources = {"secure": ("SHA-256", "127.0.0.2"), "legacy": ("MD5", "127.0.0.4")}
    with ThreadPoolExecutor(2) as pool:
        futures = {trunk: pool.submit(place_calls, target, [wav], 1, hold=1.0, timeout=90,
                                      caller_args=auth_args(algorithm, bind=bind))
                   for trunk, (algorithm, bind) in sources.items()}
        results = {trunk: future.result()[0] for trunk, future in futures.items()}
    for trunk, result in results.items():
        assert result["confirmed"], (trunk, result, gateway.log())
        started = transcribed(gateway, result["call_id"], entry)[0]
        assert started["trunk"] == trunk
    log = gateway.log()
    assert "trunk secure, digest SHA-256" in log and "trunk legacy, digest MD5" in log


@pytest.mark.parametrize(("bind", "status"), [("127.0.0.2", 401), ("127.0.0.3", 407)], ids=["401", "407"])
def test_wrong_credentials_get_a_challenge_again_and_no_call(gateway, tmp_path, bind, status):
    wav = pcm_wav(get_entry("prompt_one-moment-please.wav").file, tmp_path)
    (result,) = place_calls(f"127.0.0.1:{gateway.sip_port}", [wav], 1, hold=0.5, timeout=30,
                            caller_args=auth_args("any", password="guess", bind=bind))
    assert not result["confirmed"] and result["status"] == status, result


def test_unknown_source_gets_nothing(gateway):
    (sock,) = sockets(["127.0.1.1"])
    try:
        for _ in range(3):
            sock.sendto(invite("127.0.1.1", sock.getsockname()[1], gateway.sip_port), ("127.0.0.1", gateway.sip_port))
        assert drain([sock], 2.0) == []
    finally:
        sock.close()
    assert "dropped INVITE from 127.0.1.1" in gateway.log() and "see the trunks" in gateway.log()


def test_flood_leaves_the_real_call_alone_and_memory_bounded(gateway, tmp_path):
    """Twice 10x the call capacity in INVITEs from one source and as many from 40 more
    loopback addresses, while a real (authenticated) call is transcribed: the call's transcript is
    unaffected, the flood gets at most the free slots, else 503 or silence, never more bytes
    than it sent, and the gateway's memory stays bounded."""
    entry = get_entry("caller_02_conference.wav")
    wav = pcm_wav(entry.file, tmp_path)
    target = f"127.0.0.1:{gateway.sip_port}"
    before_rss = rss_kb(gateway.proc.pid)  # for the record: the first transcription itself allocates
    known = {e["sip_call_id"] for e in read_events(gateway.events_stream) if e["type"] == "call.started"}
    with ThreadPoolExecutor(1) as pool:
        real = pool.submit(place_calls, target, [wav], 1, hold=1.0, timeout=120, caller_args=auth_args("SHA-256"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # the real call first (it must hold its slot), and its first final: ASR's own first
            # allocations are then behind us, and what RSS does next is the flood's
            events = read_events(gateway.events_stream)
            mine = {e["sip_call_id"] for e in events if e["type"] == "call.started"} - known
            if mine and any(e["type"] == "turn.final" and e["sip_call_id"] in mine for e in events):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the real call did not start:\n{gateway.log()}")
        one = sockets(["127.0.0.5"])
        spoofed = sockets([f"127.0.0.{n}" for n in range(10, 50)])
        sent = 0
        replies: list[bytes] = []
        rss: list[int] = []
        try:
            for _round in range(2):  # the second round must not grow the gateway further
                for n in range(10 * MAX_CALLS):
                    for sock in (one[0], spoofed[n % len(spoofed)]):
                        source, port = sock.getsockname()
                        data = invite(source, port, gateway.sip_port)
                        sock.sendto(data, ("127.0.0.1", gateway.sip_port))
                        sent += len(data)
                replies += drain(one + spoofed, 3.0)
                rss.append(rss_kb(gateway.proc.pid))
        finally:
            for sock in one + spoofed:
                sock.close()
        (result,) = real.result()
    assert result["confirmed"], result
    transcribed(gateway, result["call_id"], entry)
    firsts = [r.split(b"\r\n", 1)[0] for r in replies]
    # the flood may take the slots the real call left free (never ACKed, they end after 64*T1
    # without a BYE); everything else is 503 or silence
    answered = sum(1 for line in firsts if line == b"SIP/2.0 200 OK")
    assert answered <= MAX_CALLS - 1, firsts
    assert set(firsts) - {b"SIP/2.0 200 OK"} <= {b"SIP/2.0 503 Service Unavailable - Call Limit Reached",
                                                 b"SIP/2.0 503 Service Unavailable - Too Many Unconfirmed Calls"}, firsts
    assert sum(map(len, replies)) <= sent  # no reflection
    growth = rss[1] - rss[0]
    print(f"flood: {2 * 2 * 10 * MAX_CALLS} INVITEs, {sent} bytes; replies {len(firsts)} ({answered} answered), "
          f"{sum(map(len, replies))} bytes; gateway RSS {before_rss} kB before, {rss} kB after each round")
    assert growth < 20_000, f"RSS grew by {growth} kB in the second round"
