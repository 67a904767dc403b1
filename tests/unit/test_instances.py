"""Gateway instances (gateway/instances.py): the heartbeat registry, `earshot status`, and the
gateway-lost sweep, against the machine's Redis and real SQLite / PostgreSQL stores."""

import asyncio
import json
import time
import uuid

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from gateway.config import Settings
from gateway.events import (
    CALL_ENDED,
    CALL_STARTED,
    TURN_FINAL,
    CallInfo,
    Event,
    EventFactory,
    Source,
    decode_fields,
)
from gateway.instances import (
    ALIVE,
    DRAINING,
    GATEWAY_LOST,
    LOST,
    SILENT,
    GatewayLostSweep,
    classify,
    read_instances,
    registry_key,
)
from gateway.persister import Persister
from gateway.presence import Heartbeat
from gateway.publisher import Publisher
from gateway.status import collect_status, render_status
from gateway.store.db import make_sessionmaker
from gateway.store.models import Call, CallEvent
from tests.pg_server import engine, pg_store_url, store_url  # noqa: F401
from tests.waiting import wait_for

REDIS_URL = "redis://127.0.0.1:6379/0"


def describe(instance: str, *, sip: int, draining: bool = False, calls: int = 0):
    return lambda: {"instance": instance, "host": "box1", "sip_port": sip, "http_port": sip + 1000,
                    "version": "0.1.0", "started": 1_700_000_000.0, "active_calls": calls, "draining": draining}


def test_classify_states():
    body = {"instance": "gw", "heartbeat": 1000.0, "draining": False}
    assert classify(body, 1001.0, 2.0, 60.0).state == ALIVE
    assert classify({**body, "draining": True}, 1001.0, 2.0, 60.0).state == DRAINING
    assert classify(body, 1007.0, 2.0, 60.0).state == SILENT  # key expired (3 heartbeats), not lost yet
    assert classify(body, 1061.0, 2.0, 60.0).state == LOST
    assert classify({"heartbeat": 1000.0}, 1001.0, 2.0, 60.0) is None  # not a gateway's


def test_heartbeats_listed_draining_and_lost(prefix):
    async def main():
        client = aioredis.Redis.from_url(REDIS_URL)
        names = Settings(stream_prefix=prefix).asr_pool_names
        a = Heartbeat(client, names.gateway("gw-a"), 0.2, describe("gw-a", sip=5060, calls=2),
                      registry=registry_key(prefix))
        b = Heartbeat(client, names.gateway("gw-b"), 0.2, describe("gw-b", sip=5062, draining=True, calls=1),
                      registry=registry_key(prefix))
        await a.start()
        await b.start()
        try:
            views = await read_instances(client, prefix, heartbeat_s=0.2, lost_after_s=5)
            assert [(v.instance, v.state, v.sip_port, v.active_calls) for v in views] == [
                ("gw-a", ALIVE, 5060, 2), ("gw-b", DRAINING, 5062, 1)]
            status = await collect_status(Settings(stream_prefix=prefix, asr_pool_heartbeat_s=0.2,
                                                   gateway_lost_after_s=5))
            assert [(g["instance"], g["state"]) for g in status["gateways"]] == [("gw-a", "alive"),
                                                                                 ("gw-b", "draining")]
            text = render_status(status)
            assert "Gateway instances: 2" in text and "draining" in text
            # gw-a dies (no close: its key expires, the registry keeps its last heartbeat)
            assert a._task is not None
            a._task.cancel()
            await asyncio.gather(a._task, return_exceptions=True)
            a._task = None
            later = time.time() + 6
            views = await read_instances(client, prefix, heartbeat_s=0.2, lost_after_s=5, now=later)
            assert {v.instance: v.state for v in views}["gw-a"] == LOST
            async def expired() -> bool:
                return not await client.exists(names.gateway("gw-a"))

            await wait_for(expired, 5, "gw-a's key to expire")
            seen: dict = {}

            async def gw_a_lost() -> bool:
                await b.beat()  # gw-b just beat: alive (draining) whatever the machine's load
                seen["status"] = await collect_status(Settings(stream_prefix=prefix, asr_pool_heartbeat_s=0.2,
                                                               gateway_lost_after_s=1))
                return any(g["instance"] == "gw-a" and g["state"] == "lost" for g in seen["status"]["gateways"])

            await wait_for(gw_a_lost, 10, lambda: f"gw-a to be lost: {seen.get('status')}")
            status = seen["status"]
            states = {g["instance"]: g["state"] for g in status["gateways"]}
            assert states == {"gw-a": "lost", "gw-b": "draining"}, status["gateways"]
            assert "gateway-lost" in render_status(status)
            # a clean stop leaves the registry: not lost
            await b.close()
            views = await read_instances(client, prefix, heartbeat_s=0.2, lost_after_s=5)
            assert [v.instance for v in views] == ["gw-a"]
        finally:
            await a.close()
            await b.close()
            await client.aclose()

    asyncio.run(main())


def call_events(gateway: str, *, ended: bool, start: float):
    sip_call_id = uuid.uuid4().hex[:14]
    info = CallInfo(str(uuid.uuid4()), sip_call_id, "sip:alice@pbx.example", "sip:support@earshot", start,
                    ("support",), Source("sip", (("call_id", sip_call_id), ("transport", "udp"))))
    factory = EventFactory(info)
    events = [factory.make(CALL_STARTED, {"codec": "PCMU", "language": None, "legs": ["caller"],
                                          "gateway": gateway})]
    for turn in (1, 2):
        events.append(factory.make(TURN_FINAL, {"turn": turn, "start_ms": turn * 1000, "end_ms": turn * 1000 + 800,
                                                "text": f"words of turn {turn}", "reason": "silence"},
                                   leg="caller"))
    if ended:
        events.append(factory.make(CALL_ENDED, {"reason": "bye", "duration_ms": 4000, "turns": 2, "dtmf": 0}))
    for n, event in enumerate(events):
        event.created_at = start + n * 0.25
    return events


async def publish(prefix, events):
    publisher = Publisher(REDIS_URL, events_stream=f"{prefix}:events", call_stream=lambda c: f"{prefix}:call:{c}")
    await publisher.start()
    for event in events:
        publisher.publish(event)
    assert await publisher.flush(10)
    await publisher.close()


async def stream_ids(client, stream):
    return [decode_fields(fields).event_id for _, fields in await client.xrange(stream)]


@pytest.mark.parametrize("store_url", ["sqlite", "pg"], indirect=True)
def test_lost_gateway_calls_end_once(prefix, store_url, engine):  # noqa: F811
    start = time.time() - 30
    lost_open = [call_events("gw-dead", ended=False, start=start) for _ in range(2)]
    lost_done = call_events("gw-dead", ended=True, start=start)  # ended before its gateway died
    alive_open = call_events("gw-live", ended=False, start=start)
    own_end_unstored = call_events("gw-dead", ended=False, start=start)  # its call.ended is in Redis only
    restart_at = time.time() - 10  # gw-again was killed and restarted under the same id
    before_restart = call_events("gw-again", ended=False, start=start)
    after_restart = call_events("gw-again", ended=False, start=restart_at + 2)

    async def main():
        client = aioredis.Redis.from_url(REDIS_URL)
        await publish(prefix, [e for call in lost_open + [lost_done, alive_open, own_end_unstored, before_restart,
                                                          after_restart] for e in call])
        sessions = make_sessionmaker(engine)
        # store everything once (no sweep yet)
        stream = f"{prefix}:events"
        first = Persister(REDIS_URL, stream=stream, engine=engine, block_ms=100, consumer="p0")
        await first.start()
        assert await first.wait_idle(20)
        await first.close()
        # then the gateway's own call.ended of one call reaches Redis, not the store (persister not running)
        own = own_end_unstored[0]
        await publish(prefix, [Event(CALL_ENDED, own.call, len(own_end_unstored) + 1,
                                     {"reason": "bye", "duration_ms": 1000})])

        dead_seen = time.time() - 10
        await client.hset(registry_key(prefix), f"{prefix}:gateway:gw-dead", json.dumps(
            {"instance": "gw-dead", "host": "box1", "sip_port": 5060, "active_calls": 3, "draining": False,
             "heartbeat": dead_seen}))
        live = Heartbeat(client, f"{prefix}:gateway:gw-live", 0.2, describe("gw-live", sip=5062, calls=1),
                         registry=registry_key(prefix))
        again = Heartbeat(client, f"{prefix}:gateway:gw-again", 0.2,
                          lambda: {**describe("gw-again", sip=5064)(), "started": restart_at},
                          registry=registry_key(prefix))
        await live.start()
        await again.start()
        try:
            # two persisters, each with its sweep, race on the same lost gateway
            persisters = [Persister(REDIS_URL, stream=stream, engine=engine, block_ms=100, consumer=f"p{i}",
                                    gateway_lost=GatewayLostSweep(prefix, heartbeat_s=0.2, lost_after_s=5))
                          for i in (1, 2)]
            for p in persisters:
                await p.start()

            def ended_reasons():
                with sessions() as db:
                    return {c.call_id: (c.status, c.end_reason) for c in db.scalars(select(Call))}

            lost_ids = [call[0].call_id for call in lost_open + [before_restart]]
            await wait_for(lambda: all(ended_reasons().get(c) == ("ended", GATEWAY_LOST) for c in lost_ids), 20,
                           lambda: f"lost calls to end: {ended_reasons()}")
            # one more sweep each, directly: nothing more to write
            for p in persisters:
                assert p.gateway_lost is not None
                assert await p.gateway_lost.sweep(client, sessions) == 0
            for p in persisters:
                assert await p.wait_idle(20)
            published = sum(p.gateway_lost.published for p in persisters if p.gateway_lost)
            for p in persisters:
                await p.close()
        finally:
            await live.close()
            await again.close()

        assert published == 3  # one per lost open call, whichever persister wrote it
        reasons = ended_reasons()
        assert reasons[lost_done[0].call_id] == ("ended", "bye")
        assert reasons[alive_open[0].call_id] == ("live", None)
        assert reasons[after_restart[0].call_id] == ("live", None)  # the restarted run's own call
        assert reasons[own_end_unstored[0].call_id] == ("ended", "bye")  # its own end, not gateway-lost
        ids = await stream_ids(client, stream)
        assert len(ids) == len(set(ids)), "an event_id twice in the events stream"
        assert sorted(i for i in ids if i.endswith(":gateway-lost")) == sorted(f"{c}:gateway-lost" for c in lost_ids)
        for call, seen in [(c, dead_seen) for c in lost_open] + [(before_restart, restart_at)]:
            cid = call[0].call_id
            per_call = await stream_ids(client, f"{prefix}:call:{cid}")
            assert per_call == [e.event_id for e in call] + [f"{cid}:gateway-lost"]  # what was before stays
            entry = (await client.xrevrange(f"{prefix}:call:{cid}", count=1))[0][1]
            ended = decode_fields(entry)
            assert ended.type == CALL_ENDED and ended.data["reason"] == GATEWAY_LOST
            assert ended.data["turns"] == 2 and ended.created_at == pytest.approx(seen, abs=0.01)
            assert ended.data["duration_ms"] == pytest.approx((seen - call[0].created_at) * 1000, abs=2)
        with sessions() as db:
            rows = db.scalars(select(CallEvent.event_id).where(CallEvent.event_id.like("%:gateway-lost"))).all()
            assert sorted(rows) == sorted(f"{c}:gateway-lost" for c in lost_ids)  # one store update each
            gw = {c.call_id: c.gateway for c in db.scalars(select(Call))}
            assert gw[alive_open[0].call_id] == "gw-live" and gw[lost_ids[0]] == "gw-dead"
            assert db.get(Call, lost_ids[0]).turn_count == 2
        await client.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_late_gateway_lost_does_not_overwrite_own_end(prefix, store_url, engine):  # noqa: F811
    """A gateway-lost call.ended stored after the call's own call.ended changes nothing."""
    from gateway.instances import OpenCall, gateway_lost_event
    from gateway.persister import StreamEvent, store_events

    events = call_events("gw-x", ended=True, start=time.time() - 20)
    info = events[0].call
    lost = gateway_lost_event(OpenCall(info.call_id, info.sip_call_id, info.from_uri, info.to_uri, info.tags,
                                       "sip", info.source.ids, None, 2, 0), time.time())
    items = [StreamEvent(f"{n}-0", e, e.to_dict()) for n, e in enumerate(events + [lost], 1)]
    sessions = make_sessionmaker(engine)
    with sessions() as db, db.begin():
        store_events(db, items)
    with sessions() as db:
        assert db.get(Call, info.call_id).end_reason == "bye"


def test_publish_once_marker_outlives_the_call_stream(prefix):
    """The marker, not only the call stream's last entry, keeps the event single (a stream may expire)."""
    from gateway.instances import OpenCall, gateway_lost_event

    async def main():
        client = aioredis.Redis.from_url(REDIS_URL)
        sweep = GatewayLostSweep(prefix, heartbeat_s=0.2, lost_after_s=5)
        event = gateway_lost_event(OpenCall(str(uuid.uuid4()), "sip-1", "sip:a@x", "sip:b@y", (), "sip",
                                            (("call_id", "sip-1"), ("transport", "udp")), None, 0, 0), time.time())
        try:
            assert await sweep._publish_once(client, event) == 1
            await client.delete(f"{prefix}:call:{event.call_id}")  # expired
            assert await sweep._publish_once(client, event) == 0
            assert await stream_ids(client, f"{prefix}:events") == [f"{event.call_id}:gateway-lost"]
            assert (sweep.published, sweep.skipped) == (1, 1)
        finally:
            await client.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_board_shows_every_gateway(prefix, store_url, engine, tmp_path):  # noqa: F811
    """The live board lists the registry's gateways (alive, draining, lost) and the calls on each."""
    import re

    from fastapi.testclient import TestClient

    from gateway.store.users import create_user
    from gateway.web.app import Dashboard

    with make_sessionmaker(engine)() as db:
        create_user(db, "alice", "a long enough password", "supervisor")
        db.commit()
    call = call_events("gw-live", ended=False, start=time.time() - 5)
    asyncio.run(publish(prefix, call))
    client = redis_sync()
    now = time.time()
    for name, age, draining in (("gw-live", 0.1, False), ("gw-drain", 0.1, True), ("gw-dead", 120, False)):
        client.hset(registry_key(prefix), f"{prefix}:gateway:{name}", json.dumps(
            {"instance": name, "host": "box1", "sip_port": 5060, "http_port": 8080, "version": "0.1.0",
             "active_calls": 1, "draining": draining, "heartbeat": now - age}))
    client.close()
    settings = Settings(database_url=store_url, stream_prefix=prefix, web_secret_file=str(tmp_path / "secret"),
                        asr_pool_heartbeat_s=2, gateway_lost_after_s=60)
    d = Dashboard(settings, engine=engine)
    with TestClient(d.asgi) as web:
        web.portal.call(d.start)  # `earshot run` starts it (uvicorn runs without lifespan)
        page = web.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        web.post("/login", data={"username": "alice", "password": "a long enough password", "csrf_token": csrf,
                                 "next": "/"}, follow_redirects=False)
        deadline = time.time() + 10
        while d.hub.get(call[0].call_id) is None and time.time() < deadline:
            time.sleep(0.1)
        html = web.get("/").text
        web.portal.call(d.close)
    rows = dict(re.findall(r'<tr data-instance="([^"]+)" class="gateway (\w+)">', html))
    assert rows == {"gw-live": "alive", "gw-drain": "draining", "gw-dead": "lost"}, html
    assert "(1 on the board)" in html  # gw-live's call, from its call.started


def redis_sync():
    import redis

    return redis.Redis.from_url(REDIS_URL)
