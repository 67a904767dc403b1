"""Faults under call load, with real servers: Redis restarted, PostgreSQL stopped, an ASR
worker and the persister killed with SIGKILL, each while four pjsua2 calls play fixture
speech. After each, every turn of every call is in Redis once (by event_id) and in the SQL
store once, and the two agree with each other and with what the gateway says it published
(``earshot_published_events_total``).

The default run (CI) has quick variants (outages of a few seconds, each test well under a
minute with the stub ASR); the slow variants (60 s outages, eight calls) are collected only
with ``FAULTS_SLOW=1`` (README, "Fault tests"):

    FAULTS_SLOW=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/e2e/test_faults.py -m slow

The ASR is the stub engine (placeholder text at once): what is tested is delivery, not
recognition, and Whisper on a shared CPU would only make the calls slower.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from gateway.events import parse_fields
from tests.e2e.harness import (REDIS_URL, ROOT, GatewayProcess, _wait_until_ready, by_call, parse_metrics, place_calls,
                               start_gateway, start_worker)
from tests.e2e.test_durability import long_wav
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.e2e]

SLOW = bool(os.environ.get("FAULTS_SLOW"))
QUICK_OUTAGE_S = 5.0
SLOW_OUTAGE_S = 60.0


def variants(quick: object, slow: object) -> list:
    """The quick variant always; the slow one (marked ``slow``) only with FAULTS_SLOW set.

    Not a skip: under CI a skip is a failure (tests/conftest.py), and the slow variant is
    simply not part of the default run."""
    out = [pytest.param(quick, id="quick")]
    if SLOW:
        out.append(pytest.param(slow, id="slow", marks=pytest.mark.slow))
    return out


COMMON_ENV = {"EARSHOT_ASR_MODEL": "stub", "EARSHOT_WEB_ENABLED": "false", "EARSHOT_DRAIN_TIMEOUT_S": "0",
              "EARSHOT_MEDIA_TIMEOUT_S": "120", "EARSHOT_PUBLISH_SPOOL_AFTER_S": "1"}


# -- load


@dataclass
class Load:
    """Calls in a background thread; ``join`` returns pjsua2's result per call."""

    thread: threading.Thread
    results: list[dict] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def join(self, timeout: float) -> list[dict]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the calls did not finish"
        assert not self.errors, self.errors
        assert self.results and all(r["confirmed"] for r in self.results), self.results
        return self.results


def start_calls(gw: GatewayProcess, tmp_path: Path, calls: int, seconds: float) -> Load:
    """``calls`` concurrent calls of ``seconds`` of fixture speech each (4 per pjsua2 process)."""
    wavs = [long_wav(tmp_path, seconds, i % 4) for i in range(min(calls, 4))]
    load = Load(threading.Thread(target=lambda: None))

    def run() -> None:
        try:
            load.results.extend(place_calls(f"127.0.0.1:{gw.sip_port}", wavs, calls, hold=1.0,
                                            timeout=seconds + 60))
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            load.errors.append(exc)

    load.thread = threading.Thread(target=run, daemon=True)
    load.thread.start()
    return load


# -- what Redis and the store hold


def stream_events(url: str, stream: str) -> list[dict]:
    client = redis.Redis.from_url(url)
    try:
        return [parse_fields(fields) for _id, fields in client.xrange(stream)]
    finally:
        client.close()


def count_finals(url: str, stream: str) -> int:
    return sum(e["type"] == "turn.final" for e in stream_events(url, stream))


def metrics(gw: GatewayProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/metrics", timeout=10) as response:
        return parse_metrics(response.read().decode())


def wait(predicate, timeout: float, what) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.2)


def store_rows(database_url: str) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]]]:
    """(event_id, type) of every logged event, and (call, leg, turn) of every final turn."""
    from sqlalchemy import text

    from gateway.store.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            events = [(r[0], r[1]) for r in conn.execute(text("SELECT event_id, type FROM call_events"))]
            turns = [(r[0], r[1], r[2]) for r in conn.execute(text("SELECT call_id, leg, turn FROM turns WHERE final"))]
    finally:
        engine.dispose()
    return events, turns


def stored_finals(database_url: str) -> int:
    try:
        return len(store_rows(database_url)[1])
    except Exception:  # noqa: BLE001 - the database may be down or not migrated yet
        return -1


def check_delivery(redis_url: str, stream: str, results: list[dict], database_url: str,
                   published: float | None) -> dict[str, int]:
    """Every call's turns in Redis once and in order, the store holding exactly the same events.

    Returns the counts checked (for the report)."""
    events = stream_events(redis_url, stream)
    ids = [e["event_id"] for e in events]
    twice = [i for i, n in Counter(ids).items() if n > 1]
    assert not twice, f"published twice: {twice}"
    if published is not None:
        assert published == len(events), (published, len(events))
    calls = by_call(events)
    assert set(calls) == {r["call_id"] for r in results}, (set(calls), results)
    finals_total = 0
    for sip_call_id, mine in calls.items():
        types = [e["type"] for e in mine]
        assert types.count("call.started") == 1 and types.count("call.ended") == 1, (sip_call_id, types)
        assert types[0] == "call.started" and types[-1] == "call.ended", (sip_call_id, types)
        finals = [e for e in mine if e["type"] == "turn.final"]
        assert not [f for f in finals if f.get("error")], finals
        # turns are numbered from 1 per call; call.ended counts them: none missing, none twice
        assert sorted(f["turn"] for f in finals) == list(range(1, mine[-1]["turns"] + 1)), (sip_call_id, types)
        assert mine[-1]["turns"] >= 2, (sip_call_id, types)
        finals_total += len(finals)
    # the store: every event the persister logs (all but partials), once; one final row per turn
    logged = [(e["event_id"], e["type"]) for e in events if e["type"] != "turn.partial"]
    stored, final_turns = store_rows(database_url)
    assert len(stored) == len({i for i, _ in stored}), "an event stored twice"
    assert sorted(stored) == sorted(logged), (set(logged) ^ set(stored))
    assert len(final_turns) == len(set(final_turns)) == finals_total, (len(final_turns), finals_total)
    return {"calls": len(calls), "events": len(events), "finals": finals_total, "stored_events": len(stored)}


def wait_stored(database_url: str, redis_url: str, stream: str, timeout: float) -> None:
    wait(lambda: stored_finals(database_url) == count_finals(redis_url, stream), timeout,
         lambda: f"the store to hold every final ({stored_finals(database_url)} of "
                 f"{count_finals(redis_url, stream)})")


def wait_ended(redis_url: str, stream: str, results: list[dict], timeout: float) -> None:
    ids = {r["call_id"] for r in results}
    wait(lambda: ids <= {e["sip_call_id"] for e in stream_events(redis_url, stream) if e["type"] == "call.ended"},
         timeout, "call.ended of every call")


def delete_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def report(name: str, started: float, counts: dict[str, int]) -> None:
    print(f"\n{name}: {time.monotonic() - started:.1f} s, {counts}")


# -- 1. Redis restarted mid-call


@pytest.mark.parametrize("outage_s", variants(QUICK_OUTAGE_S, SLOW_OUTAGE_S))
def test_redis_killed_and_restarted_mid_call(tmp_path, outage_s):
    """Redis (append-only file, fsync always, as in production) dies by SIGKILL while four
    calls talk, and comes back on the same port and data directory ``outage_s`` later. The
    gateway buffers and spools what it cannot publish, and publishes it once when Redis is
    back; the embedded persister reconnects and stores everything once."""
    started = time.monotonic()
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data_dir=str(data)).start()
    database = f"sqlite:///{tmp_path / 'earshot.db'}"
    try:
        gw = start_gateway({**COMMON_ENV, "EARSHOT_REDIS_URL": server.url, "EARSHOT_DATABASE_URL": database,
                            "EARSHOT_PUBLISH_SPOOL_FILE": str(tmp_path / "events.spool")})
    except BaseException:
        server.stop()
        raise
    try:
        load = start_calls(gw, tmp_path, 4, outage_s + 16)
        stream = gw.events_stream
        wait(lambda: count_finals(server.url, stream) >= 4, 60, "finals before the outage")
        before = count_finals(server.url, stream)
        assert server.proc is not None
        server.proc.kill()  # a crash: no shutdown, no final save (the AOF has every write)
        server.proc.wait()
        server.proc = None
        time.sleep(outage_s)
        down = metrics(gw)
        assert down["earshot_publish_backlog"] > 0, "nothing waited for Redis: the outage tested nothing"
        server.start()
        results = load.join(outage_s + 90)
        wait_ended(server.url, stream, results, 60)
        wait(lambda: metrics(gw)["earshot_publish_backlog"] == 0, 30, "the backlog to drain")
        wait_stored(database, server.url, stream, 60)
        m = metrics(gw)
        counts = check_delivery(server.url, stream, results, database, m["earshot_published_events_total"])
        assert counts["finals"] > before, "no final was made during or after the outage"
        assert m["earshot_publish_refused_total"] == 0 and m["earshot_stream_trimmed_unread_total"] == 0
        report(f"redis outage {outage_s:g} s", started,
               {**counts, "finals_before_outage": before, "backlog_in_outage": int(down["earshot_publish_backlog"]),
                "duplicates_skipped": int(m["earshot_publish_duplicates_total"])})
    finally:
        rc = gw.stop()
        server.stop()
    assert rc == 0, gw.log()


# -- 2. PostgreSQL stopped for a while


@pytest.mark.parametrize("outage_s", variants(10.0, SLOW_OUTAGE_S))
def test_postgres_stopped_and_started_mid_call(tmp_path, outage_s):
    """A private PostgreSQL (never the shared one) is stopped for ``outage_s`` while four
    calls talk: the calls go on, Redis holds what the store cannot take, the persister
    retries and, once PostgreSQL is back, stores everything once."""
    from tests.pg_server import PrivatePostgres, private_unavailable

    reason = private_unavailable()
    if reason:
        pytest.skip(reason)
    from gateway.store import migrate

    started = time.monotonic()
    pg = PrivatePostgres().start()
    gw: GatewayProcess | None = None
    rc = 0
    try:
        database = pg.url(pg.create_database())
        migrate.upgrade(database)
        gw = start_gateway({**COMMON_ENV, "EARSHOT_DATABASE_URL": database})
        stream = gw.events_stream
        load = start_calls(gw, tmp_path, 4, outage_s + 14)
        wait(lambda: stored_finals(database) >= 4, 60, "finals stored before the outage")
        before = stored_finals(database)
        pg.stop("immediate")  # a crash of the database server
        time.sleep(outage_s)
        during = count_finals(REDIS_URL, stream)
        pg.start()
        results = load.join(outage_s + 90)
        wait_ended(REDIS_URL, stream, results, 60)
        wait_stored(database, REDIS_URL, stream, 90)
        m = metrics(gw)
        counts = check_delivery(REDIS_URL, stream, results, database, m["earshot_published_events_total"])
        assert during > before, "no final was published while PostgreSQL was down"
        assert m["earshot_persister_db_up"] == 1
        assert "database unavailable" in gw.log(), gw.log()
        report(f"postgres outage {outage_s:g} s", started,
               {**counts, "finals_stored_before": before, "finals_published_by_restart": during})
    finally:
        if gw is not None:
            rc = gw.stop()
            delete_keys(REDIS_URL, gw.prefix)
        pg.destroy()
    assert rc == 0, gw.log()


# -- 3. an ASR worker killed while it holds jobs


def held_finals(prefix: str, worker_id: str) -> list[str]:
    """Request ids of the final jobs the worker holds (delivered to it, not acknowledged)."""
    import json

    from gateway.asr.remote.wire import PoolNames

    client = redis.Redis.from_url(REDIS_URL)
    names = PoolNames(prefix)
    stream = names.jobs("final")
    try:
        try:
            rows = client.xpending_range(stream, names.group, min="-", max="+", count=100, consumername=worker_id)
        except redis.ResponseError:
            return []
        return [json.loads(fields[b"meta"])["id"] for row in rows
                for _id, fields in client.xrange(stream, row["message_id"], row["message_id"])]
    finally:
        client.close()


def withdrawn(prefix: str, request_id: str) -> bool:
    """Whether the gateway cancelled the job (a speculative final whose speaker went on)."""
    from gateway.asr.remote.wire import PoolNames

    client = redis.Redis.from_url(REDIS_URL)
    try:
        return bool(client.exists(PoolNames(prefix).cancel(request_id)))
    finally:
        client.close()


@pytest.mark.parametrize("calls", variants(4, 8))
def test_pool_worker_killed_mid_job(tmp_path, calls):
    """Two `earshot worker` processes share the jobs; the first waits a second for each batch
    to fill, so it holds jobs, and is killed with SIGKILL while it holds finals. The second takes
    them over (XAUTOCLAIM): every final arrives once, none with an error. The workers run the
    packaged tiny.en on CPU (a worker has no stub engine). Speculation starts 50 ms before the
    end of the silence (as in test_pool.py), so a held final is almost surely one the gateway
    still waits for, not one it withdrew; the test checks that at least one was."""
    started = time.monotonic()
    database = f"sqlite:///{tmp_path / 'earshot.db'}"
    pool = {"EARSHOT_ASR_BACKEND": "pool", "EARSHOT_ASR_POOL_CLAIM_IDLE_S": "2", "EARSHOT_ASR_FINAL_TIMEOUT_S": "30",
            "EARSHOT_SPECULATIVE_MS": "450"}
    gw = start_gateway({**COMMON_ENV, **pool, "EARSHOT_DATABASE_URL": database})
    victim = survivor = None
    try:
        victim = start_worker(gw.prefix, {"EARSHOT_ASR_BATCH_WAIT_MS": "1000",
                                          "EARSHOT_ASR_MAX_BATCH": "16", "EARSHOT_ASR_POOL_CLAIM_IDLE_S": "2"})
        survivor = start_worker(gw.prefix, {"EARSHOT_ASR_POOL_CLAIM_IDLE_S": "2"})
        load = start_calls(gw, tmp_path, calls, 15)
        stream = gw.events_stream
        wait(lambda: count_finals(REDIS_URL, stream) >= 2, 60, "finals before the kill")
        deadline = time.monotonic() + 60
        while not (held := held_finals(gw.prefix, victim.worker_id)):
            assert time.monotonic() < deadline and load.thread.is_alive(), "the first worker never held a final"
            time.sleep(0.02)
        victim.kill()
        results = load.join(120)
        wait_ended(REDIS_URL, stream, results, 60)
        wait_stored(database, REDIS_URL, stream, 60)
        m = metrics(gw)
        counts = check_delivery(REDIS_URL, stream, results, database, m["earshot_published_events_total"])
        assert m.get('earshot_asr_remote_timeouts_total{kind="final"}', 0) == 0
        wanted = [request_id for request_id in held if not withdrawn(gw.prefix, request_id)]
        assert wanted, f"inconclusive: the gateway withdrew every final the dead worker held ({held})"
        reclaimed = survivor.metrics()["earshot_worker_reclaimed_total"]
        assert reclaimed >= len(held), survivor.log()
        report(f"pool worker killed ({calls} calls)", started,
               {**counts, "finals_held_at_kill": len(held), "still_wanted": len(wanted), "reclaimed": int(reclaimed)})
    finally:
        if victim is not None and victim.proc.poll() is None:
            victim.kill()
        wrc = survivor.stop() if survivor is not None else 0
        rc = gw.stop()
        delete_keys(REDIS_URL, gw.prefix)
    assert survivor is not None and wrc == 0, survivor.log() if survivor else ""
    assert rc == 0, gw.log()


# -- 4. the persister killed mid-batch


@dataclass
class PersistProcess:
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return "".join(self.output[-200:])


def start_persister(prefix: str, database: str, extra: dict[str, str]) -> PersistProcess:
    env = {**os.environ, "EARSHOT_REDIS_URL": REDIS_URL, "EARSHOT_STREAM_PREFIX": prefix,
           "EARSHOT_DATABASE_URL": database, "PYTHONUNBUFFERED": "1", **extra}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "persist"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    p = PersistProcess(proc)
    _wait_until_ready(proc, p.output, "earshot: persisting", 60, p.stop, "earshot persist")
    return p


def pending(prefix: str, group: str = "earshot-persister") -> dict[str, int]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return {(c["name"].decode() if isinstance(c["name"], bytes) else c["name"]): c["pending"]
                for c in client.xinfo_consumers(f"{prefix}:events", group)}
    except redis.ResponseError:
        return {}
    finally:
        client.close()


@pytest.mark.parametrize("calls", variants(4, 8))
def test_persister_killed_mid_batch(tmp_path, calls):
    """`earshot persist` runs as its own process (the gateway with persist off). The test holds
    the SQLite store's write lock, so the persister's next batch is read from Redis but cannot
    commit; the persister is killed with SIGKILL holding that batch. A new `earshot persist`
    (a new consumer name, as after a restart on another pid) claims the dead consumer's entries
    (XAUTOCLAIM after persister_claim_idle_s) and the store has every event once."""
    import sqlite3

    from gateway.store import migrate

    started = time.monotonic()
    path = tmp_path / "earshot.db"
    database = f"sqlite:///{path}"
    migrate.upgrade(database)
    persist_env = {"EARSHOT_PERSISTER_BATCH": "5", "EARSHOT_PERSISTER_CLAIM_IDLE_S": "1"}
    gw = start_gateway({**COMMON_ENV, "EARSHOT_PERSIST": "false", "EARSHOT_DATABASE_URL": database})
    first: PersistProcess | None = None
    second: PersistProcess | None = None
    lock: sqlite3.Connection | None = None
    try:
        first = start_persister(gw.prefix, database, persist_env)
        load = start_calls(gw, tmp_path, calls, 20)
        stream = gw.events_stream
        wait(lambda: stored_finals(database) >= 2, 60, "finals stored before the kill")
        lock = sqlite3.connect(path, timeout=30, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the write lock: the persister's transaction waits for it
        wait(lambda: sum(pending(gw.prefix).values()) > 0, 60, "the persister to hold a batch")
        held = sum(pending(gw.prefix).values())
        first.proc.kill()
        first.proc.wait()
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        second = start_persister(gw.prefix, database, persist_env)
        results = load.join(120)
        wait_ended(REDIS_URL, stream, results, 60)
        wait_stored(database, REDIS_URL, stream, 60)
        wait(lambda: sum(pending(gw.prefix).values()) == 0, 30, "no entry left pending")
        counts = check_delivery(REDIS_URL, stream, results, database,
                                metrics(gw)["earshot_published_events_total"])
        assert "claimed" in second.log() and "pending in other consumers" in second.log(), second.log()
        report(f"persister killed ({calls} calls)", started, {**counts, "pending_at_kill": held})
    finally:
        if lock is not None:
            lock.close()
        if first is not None and first.proc.poll() is None:
            first.proc.kill()
            first.proc.wait()
        prc = second.stop() if second is not None else 0
        rc = gw.stop()
        delete_keys(REDIS_URL, gw.prefix)
    assert prc == 0, second.log() if second else ""
    assert rc == 0, gw.log()
