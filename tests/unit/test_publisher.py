import asyncio
import json
import time

import pytest
import redis

from gateway.events import CALL_STARTED, TURN_FINAL, TURN_PARTIAL, CallInfo, EventFactory, parse_fields
from gateway.publisher import Publisher
from gateway.spool import Spool
from tests.redis_server import RedisServer


@pytest.fixture
def server():
    srv = RedisServer().start()
    yield srv
    srv.stop()


def make_publisher(url: str) -> Publisher:
    return Publisher(url, events_stream="t:events", call_stream=lambda c: f"t:call:{c}", maxlen=1000,
                     call_maxlen=100)


def entries(url: str, stream: str) -> list[dict]:
    client = redis.Redis.from_url(url)
    try:
        return [parse_fields(fields) for _id, fields in client.xrange(stream)]
    finally:
        client.close()


async def test_events_reach_global_and_call_streams_with_stable_ids(server):
    pub = make_publisher(server.url)
    await pub.start()
    factory = EventFactory(CallInfo("c1", "sip-1", "sip:a@x", "sip:b@y", 0.0, ("t",)))
    pub.publish(factory.make(CALL_STARTED, {"codec": "PCMU"}))
    pub.publish(factory.make(TURN_FINAL, {"turn": 1, "start_ms": 0, "end_ms": 900, "text": "hello"}, leg="caller",
                             speech_end_monotonic=0.0))
    assert await pub.flush(5)
    await pub.close()
    global_events = entries(server.url, "t:events")
    call_events = entries(server.url, "t:call:c1")
    assert [e["event_id"] for e in global_events] == ["c1:000001", "c1:000002"]
    assert global_events == call_events
    assert global_events[1]["schema"] == "earshot.event.v2"
    assert global_events[1]["text"] == "hello" and global_events[1]["leg"] == "caller"
    assert global_events[1]["latency_ms"] > 0
    assert "latency_ms" not in global_events[0]


async def test_nothing_is_lost_while_redis_is_down(server):
    pub = make_publisher(server.url)
    await pub.start()
    factory = EventFactory(CallInfo("c2", "sip-2", "a", "b", 0.0))
    pub.publish(factory.make(CALL_STARTED))
    assert await pub.flush(5)
    server.stop()
    for i in range(5):
        pub.publish(factory.make(TURN_FINAL, {"turn": i + 1, "start_ms": i * 1000, "end_ms": i * 1000 + 900,
                                               "text": f"turn {i}"}, leg="caller"))
    assert not await pub.flush(1.0)  # Redis is down: the events wait
    assert pub.backlog == 5 and pub.failures >= 1
    server.start()  # same port, empty (no persistence)
    assert await pub.flush(15)
    await pub.close()
    texts = [e["text"] for e in entries(server.url, "t:events")]
    assert texts == [f"turn {i}" for i in range(5)]


def test_fields_are_json_with_routing_keys():
    factory = EventFactory(CallInfo("c3", "s", "a", "b", 0.0))
    fields = factory.make(CALL_STARTED).to_fields()
    assert fields["type"] == "call.started" and fields["call_id"] == "c3"
    assert json.loads(fields["data"])["event_id"] == fields["event_id"]


# -- durability: the spool, exactly-once writes, trimming that spares the persister

def final(factory: EventFactory, i: int, **kw):
    return factory.make(TURN_FINAL, {"turn": i, "start_ms": i * 1000, "end_ms": i * 1000 + 900, "text": f"turn {i}"},
                        leg="caller", **kw)


def partial(factory: EventFactory, i: int):
    return factory.make(TURN_PARTIAL, {"turn": i, "partial": 1, "start_ms": i * 1000, "end_ms": i * 1000 + 500,
                                       "text": "tu"}, leg="caller")


def spooled_publisher(url: str, spool, **kw) -> Publisher:
    kw.setdefault("spool_after_s", 0.0)
    kw.setdefault("trim_interval_s", 0.05)
    return Publisher(url, events_stream="t:events", call_stream=lambda c: f"t:call:{c}", maxlen=1000,
                     call_maxlen=100, spool_path=spool, **kw)


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_an_outage_spools_finals_and_they_reach_redis_in_order_after_a_restart(server, tmp_path):
    """Redis down: finals go to the spool (partials do not), close does not wait for Redis, and
    the next publisher on that spool publishes every final in order, once, with its latency."""
    spool = tmp_path / "events.spool"
    factory = EventFactory(CallInfo("c4", "s", "a", "b", 0.0))
    server.stop()
    pub = spooled_publisher(server.url, spool)
    await pub.start()
    speech_end = time.monotonic()
    pub.publish(factory.make(CALL_STARTED))
    for i in range(1, 6):
        pub.publish(partial(factory, i))
        pub.publish(final(factory, i, speech_end_monotonic=speech_end))
    await wait_for(lambda: pub.spooled_backlog == 6)
    assert pub.dropped_partials == 5
    started = time.monotonic()
    await pub.close(timeout=10)
    assert time.monotonic() - started < 3  # Redis is down: nothing to wait for
    assert spool.stat().st_size > 0
    server.start()
    again = spooled_publisher(server.url, spool)
    await again.start()
    assert await again.flush(10)
    await again.close()
    got = entries(server.url, "t:events")
    assert [e["type"] for e in got] == ["call.started"] + ["turn.final"] * 5
    assert [e["event_id"] for e in got] == [f"c4:{n:06d}" for n in (1, 3, 5, 7, 9, 11)]
    assert got == entries(server.url, "t:call:c4")
    assert all(e["latency_ms"] >= 0 for e in got[1:])
    assert again.replayed == 6 and not spool.exists()  # all replayed: the file is gone


async def test_a_full_buffer_spools_the_rest_in_order(server, tmp_path):
    server.stop()
    pub = spooled_publisher(server.url, tmp_path / "s.spool", buffer_limit=3, spool_after_s=3600)
    await pub.start()
    factory = EventFactory(CallInfo("c5", "s", "a", "b", 0.0))
    for i in range(1, 11):
        pub.publish(final(factory, i))
    assert pub.spooled_backlog == 10 and pub.backlog == 10  # the 4th moved the first three along
    server.start()
    assert await pub.flush(15)
    await pub.close()
    assert [e["text"] for e in entries(server.url, "t:events")] == [f"turn {i}" for i in range(1, 11)]


async def test_replaying_events_redis_already_has_writes_none_twice(server, tmp_path):
    """A crash after Redis took a batch and before the spool recorded it: the next start sends
    them again, and Redis skips them (the origin's high-water mark)."""
    spool = tmp_path / "s.spool"
    server.stop()
    pub = spooled_publisher(server.url, spool)
    await pub.start()
    factory = EventFactory(CallInfo("c6", "s", "a", "b", 0.0))
    for i in range(1, 6):
        pub.publish(final(factory, i))
    await pub.close(timeout=0)
    before_replay = spool.read_bytes()
    server.start()
    first = spooled_publisher(server.url, spool)
    await first.start()
    assert await first.flush(10)
    await first.close()
    spool.write_bytes(before_replay)  # as if the commit never reached the disk
    second = spooled_publisher(server.url, spool)
    await second.start()
    assert await second.flush(10)
    await second.close()
    assert second.duplicates == 5 and second.published == 0
    assert [e["text"] for e in entries(server.url, "t:events")] == [f"turn {i}" for i in range(1, 6)]


async def test_a_full_spool_refuses_events_and_says_so(server, tmp_path, caplog):
    server.stop()
    pub = spooled_publisher(server.url, tmp_path / "s.spool", buffer_limit=1, spool_max_bytes=4096)
    await pub.start()
    factory = EventFactory(CallInfo("c7", "s", "a", "b", 0.0))
    for i in range(1, 40):
        pub.publish(final(factory, i))
    assert pub.refused > 0 and pub.spool_full
    assert pub.snapshot()["publish_spool_full"] == 1.0 and pub.snapshot()["publish_refused"] == pub.refused
    assert "is full" in caplog.text and "publish_spool_max_mb" in caplog.text
    await pub.close(timeout=0)


async def test_a_spool_held_by_another_process_is_reported_and_events_wait_in_memory(server, tmp_path, caplog):
    path = tmp_path / "s.spool"
    holder = Spool(path, 1 << 20)
    holder.open()  # another gateway spooling to the same file
    server.stop()
    pub = spooled_publisher(server.url, path)
    await pub.start()
    factory = EventFactory(CallInfo("c8", "s", "a", "b", 0.0))
    for i in range(1, 4):
        pub.publish(final(factory, i))
    await wait_for(lambda: pub.failures >= 3)
    assert pub.spool is None and "held by another process" in pub.spool_error
    assert pub.snapshot()["publish_spool_ok"] == 0.0 and "held by another process" in caplog.text
    assert pub.backlog == 3  # in memory
    server.start()
    assert await pub.flush(10)
    await pub.close()
    holder.close()
    assert [e["text"] for e in entries(server.url, "t:events")] == ["turn 1", "turn 2", "turn 3"]


async def test_a_gateway_that_never_spools_leaves_no_file(server, tmp_path):
    path = tmp_path / "s.spool"
    pub = spooled_publisher(server.url, path)
    await pub.start()
    pub.publish(final(EventFactory(CallInfo("c12", "s", "a", "b", 0.0)), 1))
    assert await pub.flush(5)
    await pub.close()
    assert not path.exists()


def group_reads(url: str, count: int, ack: bool = True) -> None:
    client = redis.Redis.from_url(url)
    try:
        reply = client.xreadgroup("g", "c", {"t:events": ">"}, count=count)
        if ack and reply:
            client.xack("t:events", "g", *[entry_id for entry_id, _ in reply[0][1]])
    finally:
        client.close()


async def test_trimming_never_removes_entries_the_group_has_not_acknowledged(server, tmp_path):
    client = redis.Redis.from_url(server.url)
    client.xgroup_create("t:events", "g", id="0", mkstream=True)
    pub = Publisher(server.url, events_stream="t:events", call_stream=lambda c: f"t:call:{c}", maxlen=10,
                    protect_group="g", trim_interval_s=0.05)
    await pub.start()
    factory = EventFactory(CallInfo("c9", "s", "a", "b", 0.0))
    for i in range(1, 51):
        pub.publish(final(factory, i))
    assert await pub.flush(5)
    await wait_for(lambda: pub.trim_held == 40)
    assert client.xlen("t:events") == 50 and pub.snapshot()["persister_lag"] == 50
    group_reads(server.url, 25)  # read and acknowledged
    group_reads(server.url, 5, ack=False)  # read, still pending: kept too
    await wait_for(lambda: client.xlen("t:events") == 25)
    assert pub.trim_held == 15 and pub.snapshot()["persister_lag"] == 25
    group_reads(server.url, 100)
    client.xack("t:events", "g", *[i for i, _ in client.xrange("t:events")])
    await wait_for(lambda: client.xlen("t:events") == 10)  # caught up: back to maxlen
    assert pub.trim_held == 0 and pub.snapshot()["persister_lag"] == 0
    assert [parse_fields(f)["text"] for _, f in client.xrange("t:events")] == [f"turn {i}" for i in range(41, 51)]
    await pub.close()
    client.close()


async def test_without_the_group_the_stream_is_trimmed_to_maxlen(server):
    pub = Publisher(server.url, events_stream="t:events", call_stream=lambda c: f"t:call:{c}", maxlen=10,
                    protect_group="g", trim_interval_s=0.05)
    await pub.start()
    factory = EventFactory(CallInfo("c10", "s", "a", "b", 0.0))
    for i in range(1, 31):
        pub.publish(final(factory, i))
    assert await pub.flush(5)
    client = redis.Redis.from_url(server.url)
    await wait_for(lambda: client.xlen("t:events") == 10)
    assert "persister_lag" not in pub.snapshot() and pub.trim_held == 0
    await pub.close()
    client.close()


async def test_entries_trimmed_before_the_group_read_them_are_detected(server, caplog):
    client = redis.Redis.from_url(server.url)
    client.xgroup_create("t:events", "g", id="0", mkstream=True)
    pub = Publisher(server.url, events_stream="t:events", call_stream=lambda c: f"t:call:{c}", maxlen=1000,
                    protect_group="g", trim_interval_s=0.05)
    await pub.start()
    factory = EventFactory(CallInfo("c11", "s", "a", "b", 0.0))
    for i in range(1, 21):
        pub.publish(final(factory, i))
    assert await pub.flush(5)
    group_reads(server.url, 4)
    client.xtrim("t:events", maxlen=6, approximate=False)  # someone else trims: 10 unread entries go
    await wait_for(lambda: pub.trimmed_unread > 0)
    await asyncio.sleep(0.2)  # later passes do not count them again
    assert pub.trimmed_unread == 10 and pub.snapshot()["stream_trimmed_unread"] == 10
    assert "trimmed before consumer group g read them" in caplog.text
    assert pub.snapshot()["persister_lag"] == 6
    await pub.close()
    client.close()
