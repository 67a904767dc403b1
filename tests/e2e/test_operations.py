"""What operators rely on, through real processes: the call limit answers 503 with
Retry-After, SIGTERM drains (new calls refused, active ones finish and are
transcribed), and a caller that sends no RTP is hung up on after media_timeout_s."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from gateway.asr.wer import word_error_rate
from tests.e2e.harness import by_call, pcm_wav, place_calls, read_events, start_gateway, wait_for_calls_ended
from tests.fixtures_data import get_entry
from tests.redis_server import free_port

pytestmark = [pytest.mark.e2e]

HERE = Path(__file__).resolve().parent


def test_call_limit_answers_503_with_retry_after(tmp_path):
    gw = start_gateway({"EARSHOT_MAX_CALLS": "1", "EARSHOT_RETRY_AFTER_S": "7"})
    try:
        wav = pcm_wav("prompt_tt-weasels.wav", tmp_path)
        results = place_calls(f"127.0.0.1:{gw.sip_port}", [wav], 2, hold=0.5)
        statuses = sorted(r["status"] for r in results)
        confirmed = [r for r in results if r["confirmed"]]
        assert len(confirmed) == 1, results
        refused = [r for r in results if not r["confirmed"]]
        assert [r["status"] for r in refused] == [503], statuses
        events = wait_for_calls_ended(gw.events_stream, {confirmed[0]["call_id"]}, timeout=30)
        assert {e["sip_call_id"] for e in events} == {confirmed[0]["call_id"]}  # the refused call left no trace
    finally:
        assert gw.stop() == 0


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
             "-s", "1000", "-i", "127.0.0.1", "-p", str(free_port()), "-mp", str(free_port()), "-m", "1",
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
