"""End to end with the ASR pool: `earshot run --asr pool`, real `earshot worker` processes,
real Redis, PJSIP (pjsua2) calls playing fixture speech; one worker killed with SIGKILL while
it holds jobs; a pool with no worker at all; a worker that cannot load its model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import redis

from gateway.asr.remote.wire import PoolNames
from gateway.asr.wer import word_error_rate
from tests.e2e.harness import (
    REDIS_URL,
    ROOT,
    by_call,
    parse_metrics,
    pcm_wav,
    place_calls,
    read_events,
    start_gateway,
    start_worker,
    wait_for_calls_ended,
)
from tests.e2e.test_calls import WER_BOUND, check_call
from tests.fixtures_data import get_entry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CALLERS = ["caller_01_voicemail_password.wav", "caller_02_conference.wav", "caller_03_greetings.wav",
           "caller_05_mixed.wav"]
POOL_ENV = {"EARSHOT_ASR_BACKEND": "pool", "EARSHOT_ASR_POOL_CLAIM_IDLE_S": "2", "EARSHOT_ASR_FINAL_TIMEOUT_S": "40"}


def gateway_metrics(http_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        return parse_metrics(r.read().decode())


def health(http_port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def held_finals(prefix: str, worker_id: str) -> list[str]:
    """Request ids of the finals the worker holds (delivered to it, not acknowledged)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        names = PoolNames(prefix)
        stream = names.jobs("final")
        try:
            rows = client.xpending_range(stream, names.group, min="-", max="+", count=100, consumername=worker_id)
        except redis.ResponseError:
            return []
        ids = []
        for row in rows:
            for _entry_id, fields in client.xrange(stream, row["message_id"], row["message_id"]):
                ids.append(json.loads(fields[b"meta"])["id"])
        return ids
    finally:
        client.close()


def withdrawn(prefix: str, request_id: str) -> bool:
    """Whether the gateway cancelled the job (a speculative final whose speaker went on)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return bool(client.exists(PoolNames(prefix).cancel(request_id)))
    finally:
        client.close()


def test_calls_through_the_pool_survive_a_worker_killed_mid_job(tmp_path):
    """Worker 1 waits up to a second for each batch to fill, so it holds jobs for a while; it is
    killed with SIGKILL as soon as it holds a final. Worker 2 reclaims what it held. Every turn
    of every call still gets exactly one turn.final, with the right text and no error.

    Speculation starts 50 ms before the end of the silence (speculative_ms 450) so that the
    final the dead worker holds is almost surely one the gateway still waits for, not one it
    withdrew because the speaker went on; the test checks that at least one was."""
    gw = start_gateway({**POOL_ENV, "EARSHOT_SPECULATIVE_MS": "450", "EARSHOT_ASR_FINAL_TIMEOUT_S": "20"})
    slow = start_worker(gw.prefix, {"EARSHOT_ASR_BATCH_WAIT_MS": "1000", "EARSHOT_ASR_MAX_BATCH": "8",
                                    "EARSHOT_ASR_POOL_CLAIM_IDLE_S": "2"})
    survivor = start_worker(gw.prefix, {"EARSHOT_ASR_POOL_CLAIM_IDLE_S": "2"})
    try:
        entries = [get_entry(n) for n in CALLERS]
        wavs = [pcm_wav(e.file, tmp_path) for e in entries]
        results: list[dict] = []
        caller = threading.Thread(target=lambda: results.extend(
            place_calls(f"127.0.0.1:{gw.sip_port}", wavs, len(wavs), hold=1.5, timeout=180)))
        caller.start()
        deadline = time.monotonic() + 120
        while not (held := held_finals(gw.prefix, slow.worker_id)):
            assert time.monotonic() < deadline and caller.is_alive(), "worker 1 never held a final"
            time.sleep(0.02)
        slow.kill()
        caller.join(240)
        assert results and all(r["confirmed"] for r in results), results
        ids = {r["call_id"] for r in results}
        events = wait_for_calls_ended(gw.events_stream, ids, timeout=120)
        ids_seen = [e["event_id"] for e in events]
        assert len(ids_seen) == len(set(ids_seen)), "an event was published twice"
        calls = by_call(events)
        by_wav = {str(w): e for w, e in zip(wavs, entries)}
        for result in results:
            entry = by_wav[result["wav"]]
            mine = calls[result["call_id"]]
            finals = [e for e in mine if e["type"] == "turn.final"]
            assert not [f for f in finals if f.get("error")], finals
            text = check_call(mine)  # one final per turn number, in order
            assert word_error_rate(entry.text, text) <= WER_BOUND, (entry.file, text)
            assert mine[-1]["reason"] == "bye"
        wanted = [request_id for request_id in held if not withdrawn(gw.prefix, request_id)]
        assert wanted, f"inconclusive: the gateway withdrew every final the dead worker held ({held})"
        reclaimed = survivor.metrics()["earshot_worker_reclaimed_total"]
        assert reclaimed >= len(held), survivor.log()
        gm = gateway_metrics(gw.http_port)
        assert gm["earshot_asr_remote_results_total"] >= sum(
            1 for e in events if e["type"] == "turn.final")
        assert gm.get('earshot_asr_remote_timeouts_total{kind="final"}', 0) == 0
        status, body = health(gw.http_port)
        assert status == 200 and body["asr_backend"] == "pool" and body["asr_workers"] == 1, body
    finally:
        slow.kill() if slow.proc.poll() is None else None
        rc = survivor.stop()
        gw.stop()
    assert rc == 0, survivor.log()
    assert "earshot worker: stopped" in survivor.log()


def test_with_no_worker_finals_time_out_and_the_call_ends_normally(tmp_path):
    timeout_s = 3.0
    gw = start_gateway({**POOL_ENV, "EARSHOT_ASR_FINAL_TIMEOUT_S": str(timeout_s),
                        "EARSHOT_ASR_POOL_HEARTBEAT_S": "0.5"})
    try:
        status, body = health(gw.http_port)
        assert status == 200 and body["asr"] == "no-workers" and body["asr_workers"] == 0, body
        out = subprocess.run([sys.executable, "-m", "gateway", "status"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30, env={**os.environ, "EARSHOT_STREAM_PREFIX": gw.prefix,
                                              "EARSHOT_REDIS_URL": REDIS_URL})
        assert out.returncode == 0, out.stderr
        assert "ASR workers: 0 (none alive" in out.stdout and "Gateway instances: 1" in out.stdout, out.stdout
        entry = get_entry("caller_02_conference.wav")
        results = place_calls(f"127.0.0.1:{gw.sip_port}", [pcm_wav(entry.file, tmp_path)], 1, hold=1.0)
        assert results[0]["confirmed"], results
        events = wait_for_calls_ended(gw.events_stream, {results[0]["call_id"]}, timeout=90)
        mine = by_call(events)[results[0]["call_id"]]
        finals = [e for e in mine if e["type"] == "turn.final"]
        assert len(finals) >= len(entry.turns) - 1, finals
        for f in finals:
            assert f["error"] == "asr-timeout" and f["text"] == "", f
            # published within the deadline (counted from the turn's end, 100 ms into the silence)
            assert f["latency_ms"] <= (timeout_s + 1.5) * 1000, f
        assert [f["turn"] for f in finals] == sorted(f["turn"] for f in finals)
        assert mine[-1]["type"] == "call.ended" and mine[-1]["reason"] == "bye"
        gm = gateway_metrics(gw.http_port)
        assert gm['earshot_turn_errors_total{error="asr-timeout"}'] == len(finals)
    finally:
        rc = gw.stop()
    assert rc == 0, gw.log()


def test_a_worker_that_cannot_load_its_model_refuses_to_start():
    out = subprocess.run([sys.executable, "-m", "gateway", "worker", "--model", "/nonexistent/model-dir"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert "earshot worker: cannot load ASR model '/nonexistent/model-dir'" in out.stderr, out.stderr
    assert "no such directory" in out.stderr


def test_worker_health_metrics_and_status(tmp_path):
    """A lone worker: /healthz, /metrics and `earshot status` describe it; SIGTERM stops it cleanly."""
    prefix = f"e2e-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    worker = start_worker(prefix, {"EARSHOT_ASR_POOL_HEARTBEAT_S": "0.5"})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.http_port}/healthz", timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "ok" and body["model"] == "tiny.en" and body["device"] == "cpu"
        assert body["compute_type"] == "int8"
        metrics = worker.metrics()
        assert metrics["earshot_worker_redis_up"] == 1 and metrics["earshot_worker_held"] == 0
        out = subprocess.run([sys.executable, "-m", "gateway", "status", "--json"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30, env={**os.environ, "EARSHOT_STREAM_PREFIX": prefix,
                                                         "EARSHOT_REDIS_URL": REDIS_URL})
        status = json.loads(out.stdout)
        (me,) = status["workers"]
        assert me["id"] == worker.worker_id and me["model"] == "tiny.en" and me["heartbeat_age_s"] < 2
        assert [q["stream"] for q in status["queues"]] == list(PoolNames(prefix).job_streams)
    finally:
        rc = worker.stop()
    assert rc == 0, worker.log()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert not client.exists(PoolNames(prefix).worker(worker.worker_id))  # its heartbeat went with it
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
    finally:
        client.close()
    assert read_events(f"{prefix}:events") == []
