"""A gateway killed with ``kill -9`` mid-call (issue 14, item 4): what it published stays, and
after ``gateway_lost_after_s`` a persister (here `earshot persist`, as on another box) ends
its call in the store with reason ``gateway-lost``, once; `earshot status` shows it lost.

A real `earshot run` (stub ASR, SQLite store, its own persister) takes a pjsua2 call that
speaks; once finals are in Redis and SQL the gateway is killed. The caller is still up.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import redis

from tests.e2e.harness import REDIS_URL, ROOT, pcm_wav, read_events, start_gateway

pytestmark = [pytest.mark.e2e]

LOST_AFTER_S = 3


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def sql(database: Path, query: str, *args) -> list[tuple]:
    with sqlite3.connect(database) as db:
        return db.execute(query, args).fetchall()


def test_killed_gateway_calls_end_gateway_lost(tmp_path: Path) -> None:
    database = tmp_path / "earshot.db"
    env = {"EARSHOT_DATABASE_URL": f"sqlite:///{database}", "EARSHOT_WEB_ENABLED": "false",
           "EARSHOT_ASR_MODEL": "stub", "EARSHOT_MEDIA_TIMEOUT_S": "120", "EARSHOT_ASR_POOL_HEARTBEAT_S": "0.5",
           "EARSHOT_GATEWAY_LOST_AFTER_S": str(LOST_AFTER_S), "EARSHOT_PERSISTER_CLAIM_IDLE_S": "2"}
    gw = start_gateway(env)
    wav = pcm_wav("caller_02_conference.wav", tmp_path)
    caller = subprocess.Popen([sys.executable, str(ROOT / "tests/e2e/pjsua_caller.py"),
                               "--target", f"127.0.0.1:{gw.sip_port}", "--calls", "1", "--wav", str(wav),
                               "--hold", "60", "--timeout", "90"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    persist: subprocess.Popen[str] | None = None
    client = redis.Redis.from_url(REDIS_URL)
    try:
        stream = gw.events_stream
        finals = wait(lambda: [e for e in read_events(stream) if e["type"] == "turn.final"], 60,
                      "a final in Redis")
        call_id = finals[0]["call_id"]
        wait(lambda: sql(database, "SELECT count(*) FROM turns WHERE call_id = ? AND final", call_id)[0][0] >= 1,
             30, "the final in SQL")
        started = [e for e in read_events(stream) if e["type"] == "call.started" and e["call_id"] == call_id]
        assert len(started) == 1 and started[0]["gateway"], started
        instance = started[0]["gateway"]
        assert client.hexists(f"{gw.prefix}:gateways", f"{gw.prefix}:gateway:{instance}")

        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait(10)
        killed_at = time.time()
        before = read_events(stream)
        assert caller.poll() is None, "the call should still be up on the caller's side"
        assert not [e for e in before if e["type"] == "call.ended"], "a killed gateway ends nothing"
        assert sql(database, "SELECT status, gateway FROM calls WHERE call_id = ?", call_id) == [("live", instance)]

        # another box's persister notices (the killed gateway's own persister died with it)
        persist = subprocess.Popen([sys.executable, "-m", "gateway", "persist"], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env, "EARSHOT_REDIS_URL": REDIS_URL,
                                        "EARSHOT_STREAM_PREFIX": gw.prefix})
        row = wait(lambda: [r for r in sql(database, "SELECT status, end_reason, ended_at FROM calls "
                                                     "WHERE call_id = ?", call_id) if r[0] == "ended"],
                   60, "the store to end the call")
        assert row[0][:2] == ("ended", "gateway-lost")
        print(f"store ended the call gateway-lost {time.time() - killed_at:.1f} s after kill -9")

        status = subprocess.run([sys.executable, "-m", "gateway", "status"], cwd=ROOT, text=True,
                                capture_output=True, timeout=60,
                                env={**os.environ, **env, "EARSHOT_REDIS_URL": REDIS_URL,
                                     "EARSHOT_STREAM_PREFIX": gw.prefix})
        assert status.returncode == 0, status.stderr
        line = [x for x in status.stdout.splitlines() if x.startswith(instance)]
        assert line and " lost " in line[0], status.stdout

        after = read_events(stream)
        assert after[: len(before)] == before  # what was published before stays, first
        ids = [e["event_id"] for e in after]
        assert len(ids) == len(set(ids)), "an event_id twice in Redis"
        ended = [e for e in after if e["type"] == "call.ended"]
        assert [(e["event_id"], e["reason"]) for e in ended] == [(f"{call_id}:gateway-lost", "gateway-lost")]
        # dated at the gateway's last heartbeat: before the kill
        assert datetime.fromisoformat(ended[0]["time"]).timestamp() <= killed_at
        redis_finals = sorted(e["event_id"] for e in after if e["type"] == "turn.final")
        stored = sorted(r[0] for r in sql(database, "SELECT event_id FROM call_events WHERE type = 'turn.final'"))
        assert stored == redis_finals and len(stored) >= 1
        texts = sql(database, "SELECT turn, text FROM turns WHERE call_id = ? AND final ORDER BY turn", call_id)
        assert [t for t, _ in texts] == sorted(e["turn"] for e in after if e["type"] == "turn.final")
        assert sql(database, "SELECT count(*) FROM call_events WHERE type = 'call.ended'") == [(1,)]
    finally:
        if gw.proc.poll() is None:
            gw.proc.kill()
        if persist is not None:
            persist.send_signal(signal.SIGTERM)
            try:
                persist.wait(20)
            except subprocess.TimeoutExpired:
                persist.kill()
        if caller.poll() is None:
            caller.kill()
        caller.communicate(timeout=10)
        keys = list(client.scan_iter(match=f"{gw.prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
