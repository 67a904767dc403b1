"""End to end: PJSIP (pjsua2) calls `earshot run` over loopback and plays fixture speech;
the test reads the events back from the real Redis server."""

from __future__ import annotations

import urllib.request

import pytest

from gateway.asr.wer import word_error_rate
from tests.e2e.harness import (
    by_call,
    pcm_wav,
    place_calls,
    start_gateway,
    wait_for_calls_ended,
)
from tests.fixtures_data import get_entry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# tiny.en on real 8 kHz telephone prompts through the whole path (G.711, VAD turns,
# resampling): bench/accuracy.py measures it; the bound leaves room for run-to-run
# differences in turn boundaries under load.
WER_BOUND = 0.25


@pytest.fixture(scope="module")
def gateway():
    gw = start_gateway()
    yield gw
    rc = gw.stop()
    assert rc == 0, gw.log()


def check_call(events: list[dict], expect_partials: bool = True) -> str:
    """Checks the shape of one call's events; returns the finals' text."""
    types = [e["type"] for e in events]
    assert types[0] == "call.started", types
    assert types[-1] == "call.ended", types
    assert types.count("call.started") == 1 and types.count("call.ended") == 1
    numbers = [int(e["event_id"].rsplit(":", 1)[1]) for e in events]
    assert numbers == list(range(1, len(events) + 1))
    finals = [e for e in events if e["type"] == "turn.final"]
    assert finals, types
    turns = [e["turn"] for e in finals]
    assert turns == sorted(turns) and len(set(turns)) == len(turns), turns
    assert all(f["start_ms"] < f["end_ms"] for f in finals)
    assert all(a["end_ms"] <= b["start_ms"] + 400 for a, b in zip(finals, finals[1:]))
    if expect_partials:
        assert "turn.partial" in types
    for partial in (e for e in events if e["type"] == "turn.partial"):
        final_turns = [f["turn"] for f in finals]
        assert partial["turn"] in final_turns
    return " ".join(f["text"] for f in finals)


def test_one_call_transcribed_end_to_end(gateway, tmp_path):
    entry = get_entry("caller_02_conference.wav")
    wav = pcm_wav(entry.file, tmp_path)
    results = place_calls(f"127.0.0.1:{gateway.sip_port}", [wav], 1, hold=2.0, dtmf="12#")
    assert results[0]["confirmed"], results
    sip_call_id = results[0]["call_id"]
    events = wait_for_calls_ended(gateway.events_stream, {sip_call_id}, timeout=60)
    mine = by_call(events).get(sip_call_id)
    assert mine, f"no events for {sip_call_id}:\n{gateway.log()}"
    wer = word_error_rate(entry.text, check_call(mine))
    assert wer <= WER_BOUND, ([e.get("text") for e in mine], wer)
    finals = [e for e in mine if e["type"] == "turn.final"]
    assert len(finals) >= len(entry.turns) - 1  # each pause of >= 1 s ends a turn
    assert all(f["latency_ms"] > 0 for f in finals)
    digits = "".join(e["digit"] for e in mine if e["type"] == "dtmf")
    assert digits == "12#"
    ended = mine[-1]
    assert ended["reason"] == "bye"
    assert ended["rtp"]["packets"] > entry.duration_ms / 20 * 0.9
    # the gateway's own view
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.http_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert "earshot_turn_latency_seconds_count" in metrics
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.http_port}/healthz", timeout=5) as r:
        assert r.status == 200


def test_twenty_simultaneous_calls_keep_their_own_transcripts(gateway, tmp_path):
    names = ["caller_01_voicemail_password.wav", "caller_02_conference.wav", "caller_03_greetings.wav",
             "caller_04_outbound_call.wav", "caller_05_mixed.wav"]
    entries = [get_entry(n) for n in names]
    wavs = [pcm_wav(e.file, tmp_path) for e in entries]
    results = place_calls(f"127.0.0.1:{gateway.sip_port}", wavs, 20, hold=1.0, timeout=240)
    assert all(r["confirmed"] for r in results), results
    ids = {r["call_id"] for r in results}
    events = wait_for_calls_ended(gateway.events_stream, ids, timeout=240)
    calls = by_call(events)
    assert ids <= set(calls), f"missing calls:\n{gateway.log()}"
    by_wav = {str(w): e for w, e in zip(wavs, entries)}
    for result in results:
        entry = by_wav[result["wav"]]
        text = check_call(calls[result["call_id"]], expect_partials=False)
        wer = word_error_rate(entry.text, text)
        assert wer <= WER_BOUND, (result, wer, text)
        # no words of another call's recording crept in: its own reference fits far better
        others = [word_error_rate(o.text, text) for o in entries if o.file != entry.file]
        assert wer < min(others) - 0.3, (result, wer, others)


def test_tcp_delayed_offer_call_with_hold_and_resume(gateway, tmp_path):
    """SIP over TCP, an INVITE without SDP (Cisco CUCM's default), and a hold/resume
    re-INVITE pair in the middle: the transcript still arrives whole."""
    entry = get_entry("caller_01_voicemail_password.wav")
    wav = pcm_wav(entry.file, tmp_path)
    results = place_calls(f"127.0.0.1:{gateway.sip_port}", [wav], 1, hold=1.5, transport="tcp",
                          delayed_offer=True, hold_at=5.0)
    result = results[0]
    assert result["confirmed"] and result["held"] and result["resumed"], result
    events = wait_for_calls_ended(gateway.events_stream, {result["call_id"]}, timeout=60)
    mine = by_call(events)[result["call_id"]]
    assert mine[0]["transport"] == "tcp"
    text = check_call(mine, expect_partials=False)
    assert word_error_rate(entry.text, text) <= WER_BOUND, text
    assert mine[-1]["reason"] == "bye"
