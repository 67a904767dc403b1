import json

import pytest
import redis

from gateway.events import CALL_STARTED, TURN_FINAL, CallInfo, EventFactory, parse_fields
from gateway.publisher import Publisher
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
