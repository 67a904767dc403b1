"""Durable transcripts through real processes: Redis goes down during pjsua2 calls, the
gateway spools what it cannot publish, is stopped (Redis still down) and started again,
and then every final is in Redis, in order, none twice.

The issue's check is a 60 s outage; the default run (CI) has the same scenario with a
10 s outage (about 25 s), to keep the suite quick. The 60 s run (about 75 s):

    DURABILITY_OUTAGE_S=60 .venv/bin/python -m pytest -q tests/e2e/test_durability.py

Redis here is a private redis-server with an append-only file (fsync always), so a
stop and start keeps what it had: what the test reads afterwards is what Redis was
given, before the outage and from the spool.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.request
import wave
from pathlib import Path

import pytest
import redis

from gateway.events import parse_fields
from tests.e2e.harness import GatewayProcess, parse_metrics, pcm_wav, place_calls, start_gateway
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.e2e]

CALLS = 4
OUTAGE_S = float(os.environ.get("DURABILITY_OUTAGE_S", "10"))
FIXTURES = ("caller_02_conference.wav", "caller_05_mixed.wav", "caller_03_greetings.wav", "caller_01_voicemail_password.wav")


def long_wav(directory: Path, seconds: float, index: int) -> Path:
    """Fixture speech joined end to end until it lasts ``seconds`` (each call its own order)."""
    parts = [pcm_wav(name, directory) for name in FIXTURES[index:] + FIXTURES[:index]]
    out = directory / f"call{index}.wav"
    frames, rate = b"", 8000
    while len(frames) < seconds * rate * 2:
        for part in parts:
            with wave.open(str(part), "rb") as w:
                rate = w.getframerate()
                frames += w.readframes(w.getnframes())
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames[: int(seconds * rate) * 2])
    return out


def stream_entries(url: str, stream: str) -> list[dict]:
    client = redis.Redis.from_url(url)
    try:
        return [parse_fields(fields) for _id, fields in client.xrange(stream)]
    finally:
        client.close()


def health(gw: GatewayProcess) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/healthz", timeout=10) as response:
        return json.loads(response.read())


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def run_outage(tmp_path: Path, outage_s: float) -> None:
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data_dir=str(data)).start()
    spool = tmp_path / "events.spool"
    database = tmp_path / "earshot.db"
    env = {"EARSHOT_REDIS_URL": server.url, "EARSHOT_PUBLISH_SPOOL_FILE": str(spool),
           "EARSHOT_PUBLISH_SPOOL_AFTER_S": "1", "EARSHOT_DATABASE_URL": f"sqlite:///{database}",
           "EARSHOT_WEB_ENABLED": "false", "EARSHOT_ASR_MODEL": "stub",
           "EARSHOT_DRAIN_TIMEOUT_S": "0", "EARSHOT_MEDIA_TIMEOUT_S": "120"}
    gw = start_gateway(env)
    second: GatewayProcess | None = None
    try:
        # calls longer than the outage: they are still talking when the gateway is stopped
        wavs = [long_wav(tmp_path, outage_s + 15, i) for i in range(CALLS)]
        results: list[dict] = []
        caller = threading.Thread(target=lambda: results.extend(
            place_calls(f"127.0.0.1:{gw.sip_port}", wavs, CALLS, hold=1.0, timeout=outage_s + 90)))
        caller.start()
        stream = gw.events_stream
        wait(lambda: sum(e["type"] == "turn.final" for e in stream_entries(server.url, stream)) >= CALLS,
             60, "finals before the outage")
        before = stream_entries(server.url, stream)
        server.stop()
        down_at = time.time()
        time.sleep(outage_s)
        status = health(gw)
        assert status["redis"] == "unreachable" and status["publish_spooled"] > 0, status
        rc = gw.stop()  # SIGTERM with Redis still down: the calls get a BYE, the rest goes to the spool
        assert rc == 0, gw.log()
        log = gw.log()
        assert "spooling events to" in log and "they are in the spool" in log, log
        assert spool.stat().st_size > 0
        caller.join(60)
        assert not caller.is_alive() and len(results) == CALLS, results
        assert all(r["confirmed"] for r in results), results

        server.start()
        second = start_gateway({**env, "EARSHOT_STREAM_PREFIX": gw.prefix})  # the same gateway, restarted
        wait(lambda: health(second)["publish_backlog"] == 0, 30, "the spool to be replayed")
        assert "replaying" in second.log(), second.log()
        assert spool.stat().st_size == 0  # replayed and committed: nothing left (removed at close)

        after = stream_entries(server.url, stream)
        assert after[: len(before)] == before  # what Redis had before the outage is still first
        ids = [e["event_id"] for e in after]
        assert len(ids) == len(set(ids)), "an event was published twice"
        calls: dict[str, list[dict]] = {}
        for event in after:
            calls.setdefault(event["sip_call_id"], []).append(event)
        assert set(calls) == {r["call_id"] for r in results}, (set(calls), results)
        spooled_finals = 0
        for sip_call_id, events in calls.items():
            types = [e["type"] for e in events]
            assert types[0] == "call.started" and types[-1] == "call.ended", types
            assert types.count("call.started") == 1 and types.count("call.ended") == 1, types
            numbers = [int(e["event_id"].rsplit(":", 1)[1]) for e in events]
            assert numbers == sorted(numbers), "events of a call out of order"
            finals = [e for e in events if e["type"] == "turn.final"]
            # every final the call made: call.ended counts them, turns are numbered from 1
            assert [f["turn"] for f in finals] == list(range(1, events[-1]["turns"] + 1)), (sip_call_id, types)
            assert events[-1]["reason"] == "shutdown"
            spooled_finals += sum(1 for f in finals if _epoch(f["time"]) > down_at)
        assert spooled_finals >= CALLS, "the outage should have produced finals to spool"

        # and through the persister into SQL: nothing trimmed, nothing left behind
        finals_in_redis = sum(e["type"] == "turn.final" for e in after)

        def stored() -> int:
            with sqlite3.connect(database) as db:
                return db.execute("SELECT count(*) FROM turns WHERE final").fetchone()[0]

        wait(lambda: stored() == finals_in_redis, 60, "the persister to store every final")
        time.sleep(1.5)  # the gateway reads the group's lag about once a second
        assert health(second)["persister_lag"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{second.http_port}/metrics", timeout=10) as response:
            metrics = parse_metrics(response.read().decode())
        assert metrics["earshot_persister_lag"] == 0 and metrics["earshot_publish_replayed_total"] > 0, metrics
        assert metrics["earshot_stream_trimmed_unread_total"] == 0 and metrics["earshot_publish_refused_total"] == 0
        assert metrics["earshot_persister_trimmed_total"] == 0
    finally:
        gw.stop()
        if second is not None:
            assert second.stop() == 0, second.log()
        server.stop()


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_outage_then_restart_every_final_in_order_once(tmp_path):
    run_outage(tmp_path, OUTAGE_S)
