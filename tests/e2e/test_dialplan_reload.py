"""End to end: the dialplan file of a running `earshot run` is replaced under two active
pjsua2 calls. The active calls keep the profile they were answered with (short turns,
partials) and are transcribed to the end; a broken file in between is refused and changes
nothing; a call placed after the reload gets the new profile (long turn silence, no partials).
"""

from __future__ import annotations

import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

from gateway.asr.wer import word_error_rate
from tests.e2e.harness import by_call, pcm_wav, place_calls, read_events, running_gateway, wait_for_calls_ended
from tests.fixtures_data import get_entry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FIXTURE = "caller_02_conference.wav"  # 18 s, five turns with pauses of 1 to 1.5 s
WER_BOUND = 0.3

PLAN = """\
version: 1
profiles:
  queue:
    silence_ms: {silence}
    partials: {partials}
    tags: [{tag}]
rules:
  - name: reject-anonymous
    match: {{from_user: "^anonymous$"}}
    action: reject
  - name: queue
    match: {{to_user: "^1000$"}}
    profile: queue
"""
V1 = PLAN.format(silence=400, partials="on", tag="v1")  # a turn per pause, partials while speaking
V2 = PLAN.format(silence=3000, partials="off", tag="v2")  # pauses of 1.5 s no longer end a turn
BROKEN = V2.replace("profile: queue", "profile: qeueu")


def replace(path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for_log(gw, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in gw.log():
        assert time.monotonic() < deadline, f"no {text!r} in the gateway's log:\n{gw.log()}"
        time.sleep(0.1)


def started_calls(stream: str) -> list[dict]:
    return [e for e in read_events(stream) if e["type"] == "call.started"]


def metrics(gw) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/metrics", timeout=5) as r:
        return r.read().decode()


def event_time(event: dict) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def test_replacing_the_dialplan_under_active_calls(tmp_path):
    entry = get_entry(FIXTURE)
    wav = pcm_wav(entry.file, tmp_path)
    plan = tmp_path / "dialplan.yaml"
    plan.write_text(V1)
    env = {"EARSHOT_DIALPLAN": str(plan), "EARSHOT_DIALPLAN_POLL_S": "0.2", "EARSHOT_PERSIST": "false",
           "EARSHOT_WEB_ENABLED": "false"}
    with running_gateway(env) as gw, ThreadPoolExecutor(2) as pool:
        wait_for_log(gw, "version ")
        target = f"127.0.0.1:{gw.sip_port}"
        first = pool.submit(place_calls, target, [wav], 2, hold=1.0)
        deadline = time.monotonic() + 60
        while len(started_calls(gw.events_stream)) < 2:
            assert time.monotonic() < deadline and not first.done(), gw.log()
            time.sleep(0.1)
        v1 = started_calls(gw.events_stream)[0]["dialplan_version"]

        plan.write_text(BROKEN)  # in place, as a careless edit would
        wait_for_log(gw, "unknown profile 'qeueu'")
        assert f"version {v1} stays in force" in gw.log()
        assert f'earshot_dialplan_version{{version="{v1}"}} 1.0' in metrics(gw)

        replace(plan, V2)
        wait_for_log(gw, f"in force (was {v1})")
        reloaded_at = time.time()
        assert not first.done(), "the first calls ended before the reload: nothing was tested"
        v2 = next(line for line in gw.log().splitlines() if f"in force (was {v1})" in line).split(
            "version ")[1].split()[0]
        assert v2 != v1
        assert f'earshot_dialplan_version{{version="{v2}"}} 1.0' in metrics(gw)
        second = pool.submit(place_calls, target, [wav], 1, hold=4.0)  # longer: the 3 s silence ends its turn
        old_results, new_results = first.result(), second.result()
        assert all(r["confirmed"] for r in old_results + new_results), old_results + new_results
        ids = {r["call_id"] for r in old_results + new_results}
        calls = by_call(wait_for_calls_ended(gw.events_stream, ids, timeout=60))  # before the keys are deleted

    for result in old_results:  # answered under v1: v1's profile to the end
        events = calls[result["call_id"]]
        started = events[0]
        assert (started["dialplan_rule"], started["dialplan_profile"], started["dialplan_version"],
                started["tags"]) == ("queue", "queue", v1, ["v1"])
        finals = [e for e in events if e["type"] == "turn.final"]
        partials = [e for e in events if e["type"] == "turn.partial"]
        assert len(finals) >= len(entry.turns) - 1, [f["text"] for f in finals]  # 400 ms silence: a turn a pause
        assert partials, "v1 asks for partials"
        assert sum(event_time(f) > reloaded_at for f in finals) >= 2, "turns after the reload, on v1's settings"
        assert any(event_time(p) > reloaded_at for p in partials)
        text = " ".join(f["text"] for f in finals)
        assert word_error_rate(entry.text, text) <= WER_BOUND, text
        assert events[-1]["type"] == "call.ended" and events[-1]["reason"] == "bye"
    (result,) = new_results  # answered under v2
    events = calls[result["call_id"]]
    started = events[0]
    assert (started["dialplan_profile"], started["dialplan_version"], started["tags"]) == ("queue", v2, ["v2"])
    finals = [e for e in events if e["type"] == "turn.final"]
    assert not [e for e in events if e["type"] == "turn.partial"], "v2 switches partials off"
    assert 1 <= len(finals) <= 2, [f["text"] for f in finals]  # 3 s silence: the pauses do not end turns
    text = " ".join(f["text"] for f in finals)
    assert word_error_rate(entry.text, text) <= WER_BOUND, text
