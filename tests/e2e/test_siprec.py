"""End to end: sipp, as a SIPREC recording client, forks both parties of a call to `earshot run`.

sipp (an independent SIP implementation) runs tests/e2e/sipp/siprec_uac.xml: a multipart
INVITE (SDP with two ``sendonly`` m-lines, one per party, and RFC 7865 metadata naming
the customer and the agent), then plays a capture that holds both parties' fixture
speech on two RTP streams, a metadata-only UPDATE, BYE. The gateway transcribes each
stream on its own leg with the embedded Whisper model; the events in Redis must carry
the right leg, role, name and number, and each leg's transcript must be its own
party's words.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from gateway.asr.wer import word_error_rate
from tests.e2e.harness import read_events, start_gateway
from tests.fixtures_data import get_entry, read_g711
from tests.redis_server import free_port
from tests.unit.test_gateway_failures import free_rtp_range

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (Debian's sip-tester) is not installed"),
              # play_pcap_audio writes UDP headers itself on a raw socket
              pytest.mark.skipif(os.geteuid() != 0, reason="sipp's play_pcap_audio needs root (a raw socket)")]

HERE = Path(__file__).resolve().parent
CUSTOMER = "prompt_privacy-unident.wav"  # "The party you are trying to reach does not accept unidentified calls."
AGENT = "prompt_priv-introsaved.wav"  # "Thank you. Please hold, while I attempt to connect you with your party"
WER_BOUND = 0.35
SILENCE = b"\xff" * 160  # 20 ms of mu-law silence
CAPTURE_BASE_PORT = 6000  # the capture's customer stream; the agent's is 2 above (sipp keeps the distance)


def rtp_frames(payload: bytes, lead_s: float, total_s: float) -> list[bytes]:
    frames = [SILENCE] * round(lead_s * 50)
    frames += [payload[i:i + 160].ljust(160, b"\xff") for i in range(0, len(payload), 160)]
    frames += [SILENCE] * max(0, round(total_s * 50) - len(frames))
    return frames


def write_capture(path: Path, streams: list[tuple[int, int, list[bytes]]]) -> None:
    """A pcap (Ethernet, IPv4, UDP) of PCMU RTP streams (destination port, SSRC, 20 ms frames)
    sent side by side every 20 ms: what sipp's play_pcap_audio replays."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for i in range(max(len(frames) for _port, _ssrc, frames in streams)):
        usec = i * 20_000
        for port, ssrc, frames in streams:
            if i >= len(frames):
                continue
            rtp = struct.pack("!BBHII", 0x80, 0, i & 0xFFFF, (i * 160) & 0xFFFFFFFF, ssrc) + frames[i]
            udp = struct.pack("!HHHH", port, port, 8 + len(rtp), 0) + rtp
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                             bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])) + udp
            frame = b"\x00" * 12 + b"\x08\x00" + ip
            out.append(struct.pack("<IIII", usec // 1_000_000, usec % 1_000_000, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))


def test_sipp_siprec_both_parties_transcribed_on_their_own_legs(tmp_path):
    customer, _ = read_g711(CUSTOMER)
    agent, _ = read_g711(AGENT)
    # the customer speaks first, the agent answers after a pause; both streams flow all along
    total_s = 12.0
    capture = tmp_path / "two_streams.pcap"
    write_capture(capture, [(CAPTURE_BASE_PORT, 0x5151, rtp_frames(customer, 0.5, total_s)),
                            (CAPTURE_BASE_PORT + 2, 0xA6A6, rtp_frames(agent, 6.0, total_s))])
    # exactly two port pairs, P and P+2: the first m-line gets the lower, as sipp needs
    rtp_min, rtp_max = free_rtp_range(2)
    gw = start_gateway({"EARSHOT_RTP_PORT_MIN": str(rtp_min), "EARSHOT_RTP_PORT_MAX": str(rtp_max),
                        "EARSHOT_PERSIST": "false", "EARSHOT_MEDIA_TIMEOUT_S": "30"})
    try:
        media_port = free_port() & ~1
        done = subprocess.run(
            ["sipp", f"127.0.0.1:{gw.sip_port}", "-sf", str(HERE / "sipp/siprec_uac.xml"),
             "-key", "pcap", str(capture), "-d", str(int((total_s + 3) * 1000)),
             "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1", "-mp", str(media_port),
             "-m", "1", "-timeout", "90s", "-timeout_error", "-nostdin",
             "-trace_err", "-error_file", str(tmp_path / "errors.log")],
            capture_output=True, text=True, timeout=150)
        errors = (tmp_path / "errors.log").read_text() if (tmp_path / "errors.log").exists() else ""
        assert done.returncode == 0, (done.returncode, errors, done.stdout[-2000:], gw.log())
        events = read_events(gw.events_stream)
        types = [e["type"] for e in events]
        assert types[0] == "call.started" and types[-1] == "call.ended", types
    finally:
        assert gw.stop() == 0, gw.log()
    started = events[0]
    assert started["source"]["kind"] == "siprec"
    assert started["legs"] == ["caller", "agent"]
    by_leg = {p.get("leg"): p for p in started["participants"]}
    assert (by_leg["caller"]["name"], by_leg["caller"]["number"]) == ("Alice Customer", "+15551230001")
    assert (by_leg["agent"]["name"], by_leg["agent"]["number"]) == ("Bob Agent", "+15559870002")
    finals = [e for e in events if e["type"] == "turn.final"]
    texts = {leg: " ".join(f["text"] for f in finals if f["leg"] == leg) for leg in ("caller", "agent")}
    # the calling party (the sender of the first stream) is the customer, the other the agent
    assert (by_leg["caller"]["role"], by_leg["agent"]["role"]) == ("customer", "agent"), started["participants"]
    identities = {(f["leg"], f.get("role"), f.get("participant"), f.get("number")) for f in finals}
    assert identities == {("caller", "customer", "Alice Customer", "+15551230001"),
                          ("agent", "agent", "Bob Agent", "+15559870002")}, identities
    customer_text, agent_text = get_entry(CUSTOMER).text, get_entry(AGENT).text
    for leg, own, other in (("caller", customer_text, agent_text), ("agent", agent_text, customer_text)):
        wer = word_error_rate(own, texts[leg])
        assert wer <= WER_BOUND, (leg, texts[leg], wer)
        assert word_error_rate(other, texts[leg]) > wer, (leg, texts[leg])  # not the other party's words
    # one timeline for both legs: the agent's answer starts after the customer's turn
    first = {leg: min(f["start_ms"] for f in finals if f["leg"] == leg) for leg in ("caller", "agent")}
    assert first["caller"] < first["agent"], first
    ended = events[-1]
    assert ended["rtp"]["packets"] >= 2 * int(total_s * 50) * 0.95, ended  # both streams' packets counted


def sipp_command(gw_port: int, capture: Path, total_s: float, tmp_path: Path) -> list[str]:
    return ["sipp", f"127.0.0.1:{gw_port}", "-sf", str(HERE / "sipp/siprec_uac.xml"),
            "-key", "pcap", str(capture), "-d", str(int((total_s + 3) * 1000)),
            "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1", "-mp", str(free_port() & ~1),
            "-m", "1", "-timeout", "90s", "-timeout_error", "-nostdin",
            "-trace_err", "-error_file", str(tmp_path / "errors.log")]


async def test_the_recorded_call_is_a_two_speaker_transcript_live_and_in_history(tmp_path):
    """The same SIPREC call, watched by a supervisor in headless Chromium: live, each side in
    its colour with the speaker's name and role; afterwards, from the SQL store, the same, and
    the history search finds a word of either side."""
    import asyncio
    import time

    from tests.e2e.harness import add_user, running_gateway
    from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, PASSWORD, WIDE, async_api, log_in, shot

    expect = async_api.expect
    customer, _ = read_g711(CUSTOMER)
    agent, _ = read_g711(AGENT)
    total_s = 12.0
    capture = tmp_path / "two_streams.pcap"
    write_capture(capture, [(CAPTURE_BASE_PORT, 0x5151, rtp_frames(customer, 0.5, total_s)),
                            (CAPTURE_BASE_PORT + 2, 0xA6A6, rtp_frames(agent, 6.0, total_s))])
    rtp_min, rtp_max = free_rtp_range(2)
    url = f"sqlite:///{tmp_path / 'earshot.db'}"
    with running_gateway({"EARSHOT_DATABASE_URL": url, "EARSHOT_RTP_PORT_MIN": str(rtp_min),
                          "EARSHOT_RTP_PORT_MAX": str(rtp_max), "EARSHOT_MEDIA_TIMEOUT_S": "30"}) as gw:
        add_user(url, "supervisor1", PASSWORD, role="supervisor")
        base = f"http://127.0.0.1:{gw.http_port}"
        sipp = await asyncio.create_subprocess_exec(*sipp_command(gw.sip_port, capture, total_s, tmp_path),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with async_api.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport=WIDE)
                page.set_default_timeout(30_000)
                expect.set_options(timeout=30_000)
                await log_in(page, base)
                deadline = time.monotonic() + 30
                while not (started := [e for e in read_events(gw.events_stream) if e["type"] == "call.started"]):
                    assert time.monotonic() < deadline, gw.log()
                    await asyncio.sleep(0.2)
                call_id = started[0]["call_id"]
                await page.goto(f"{base}/calls/{call_id}")
                await expect(page.locator("#call-status")).to_have_text("live")
                timeline = page.locator("#timeline")
                customer_turn = timeline.locator("li.turn.final.side-customer").first
                agent_turn = timeline.locator("li.turn.final.side-agent").first
                await expect(customer_turn.locator(".who")).to_have_text("Alice Customer customer")
                await expect(agent_turn.locator(".who")).to_have_text("Bob Agent agent")
                await expect(timeline).to_have_class(re.compile(r"\btwo-sided\b"))
                assert sipp.returncode is None, "the agent's turn came only after the call ended"
                await shot(page, "siprec-live-two-speakers-1280")
                await expect(page.locator("#call-status")).to_have_text("ended", timeout=60_000)
                out, err = await asyncio.wait_for(sipp.communicate(), 90)
                assert sipp.returncode == 0, (out[-2000:], err[-2000:], gw.log())
                finals = [e for e in read_events(gw.events_stream) if e["type"] == "turn.final"]
                said = {leg: " ".join(f["text"] for f in finals if f["leg"] == leg) for leg in ("caller", "agent")}

                # afterwards, from the store: the same two sides, and search finds either
                deadline = time.monotonic() + 30
                while True:  # the persister may still be writing the call's last events
                    await page.goto(f"{base}/calls/{call_id}")
                    if await page.locator("li.turn.final").count() == len(finals) or time.monotonic() > deadline:
                        break
                    await page.wait_for_timeout(500)
                assert await timeline.get_attribute("data-stream") is None  # from SQL, not live
                await expect(timeline).to_have_class(re.compile(r"\btwo-sided\b"))
                await expect(timeline.locator("li.turn.side-customer .who").first).to_have_text(
                    "Alice Customer customer")
                await expect(timeline.locator("li.turn.side-agent .who").first).to_have_text("Bob Agent agent")
                await shot(page, "siprec-history-two-speakers-1280")
                for leg, word in (("caller", "unidentified"), ("agent", "attempt")):
                    assert word in said[leg].lower(), said
                    await page.goto(f"{base}/calls?q={word}")
                    await expect(page.locator(f"#history tr[data-call-id='{call_id}']")).to_be_visible()
            finally:
                expect.set_options(timeout=5_000)
                await browser.close()
                if sipp.returncode is None:
                    sipp.kill()
                    await sipp.wait()
