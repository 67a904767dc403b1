"""gateway/consumer.py against the machine's Redis: groups, typed reads, acks, claims, dedupe, stop."""

import asyncio

import pytest
import redis.asyncio as aioredis

from gateway.consumer import (
    ConsumerEvent,
    StreamConsumer,
    StreamWriter,
    consumer_event_key,
    read_call_events,
)
from gateway.events import TURN_FINAL, CallInfo, EventError, EventFactory, Source
from tests.waiting import wait_for

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def client():
    c = aioredis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


def finals(n: int, call_id: str = "call-1"):
    factory = EventFactory(CallInfo(call_id, source=Source("sip", (("call_id", "x"),))))
    return [factory.make(TURN_FINAL, {"turn": i + 1, "start_ms": 0, "end_ms": 10, "text": f"turn {i + 1}"},
                         leg="caller") for i in range(n)]


async def add(client, stream, events):
    for event in events:
        await client.xadd(stream, event.to_fields())


async def pending(client, stream, group) -> int:
    return (await client.xpending(stream, group))["pending"]


async def test_group_from_dollar_skips_what_was_there_and_from_zero_reads_it(client, prefix):
    stream = f"{prefix}:events"
    await add(client, stream, finals(2))
    seen = []
    new = StreamConsumer(client, stream=stream, group="new", consumer="a", start="$")
    assert await new.poll(lambda e, _: seen.append(e.event_id), block_ms=1) == 0
    old = StreamConsumer(client, stream=stream, group="old", consumer="a", start="0")
    assert await old.poll(lambda e, _: seen.append(e.data["text"])) == 2
    assert seen == ["turn 1", "turn 2"]
    assert await pending(client, stream, "old") == 0  # acked after the handler returned


async def test_group_and_stream_are_created_when_missing(client, prefix):
    stream = f"{prefix}:nothing-yet"
    consumer = StreamConsumer(client, stream=stream, group="g", consumer="a")
    await consumer.ensure_group()
    await consumer.ensure_group()  # BUSYGROUP is fine
    assert [g["name"] for g in await client.xinfo_groups(stream)] == [b"g"]


async def test_handler_gets_typed_events_and_poison_is_acked_not_retried(client, prefix):
    stream = f"{prefix}:events"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await add(client, stream, finals(1))
    await client.xadd(stream, {"data": b"{not json"})
    await client.xadd(stream, {"data": '{"schema":"earshot.event.v2","type":"turn.final"}'})
    got = []
    consumer = StreamConsumer(client, stream=stream, group="g", consumer="a")
    await consumer.poll(lambda e, entry: got.append((e.type, e.leg, e.payload.text, entry.redelivered)))
    assert got == [("turn.final", "caller", "turn 1", False)]
    assert consumer.poison == 2 and consumer.handled == 1
    assert await pending(client, stream, "g") == 0
    await consumer.recover(lambda e, _: got.append("again"))
    assert got == [("turn.final", "caller", "turn 1", False)]


async def test_duplicate_event_ids_are_handled_once(client, prefix):
    stream = f"{prefix}:events"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    event = finals(1)[0]
    await add(client, stream, [event, event])  # e.g. a republish after a Redis failover lost the mark
    calls = []
    consumer = StreamConsumer(client, stream=stream, group="g", consumer="a")
    await consumer.poll(lambda e, _: calls.append(e.event_id))
    assert calls == [event.event_id]
    assert consumer.duplicates == 1
    assert await pending(client, stream, "g") == 0


async def test_dedupe_set_is_bounded(client, prefix):
    stream = f"{prefix}:events"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    events = finals(3)
    await add(client, stream, events + [events[0]])
    calls = []
    consumer = StreamConsumer(client, stream=stream, group="g", consumer="a", dedupe=2)
    await consumer.poll(lambda e, _: calls.append(e.data["turn"]))
    assert calls == [1, 2, 3, 1]  # the first id fell out of the 2-entry window: handlers must be idempotent


async def test_failing_handler_leaves_pending_then_drops_after_max_failures(client, prefix):
    stream = f"{prefix}:events"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await add(client, stream, finals(1))
    attempts = []

    def broken(event, entry):
        attempts.append(entry.redelivered)
        raise RuntimeError("downstream is down")

    consumer = StreamConsumer(client, stream=stream, group="g", consumer="a", max_failures=3)
    await consumer.poll(broken)
    assert await pending(client, stream, "g") == 1
    await consumer.recover(broken)
    assert await pending(client, stream, "g") == 1
    await consumer.recover(broken)
    assert attempts == [False, True, True]
    assert consumer.dropped == 1 and consumer.failures == 3
    assert await pending(client, stream, "g") == 0


async def test_restart_with_the_same_name_rereads_own_pending(client, prefix):
    stream = f"{prefix}:events"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await add(client, stream, finals(2))
    # a consumer that read and died before acking
    await client.xreadgroup("g", "worker-1", {stream: ">"}, count=10)
    got = []
    again = StreamConsumer(client, stream=stream, group="g", consumer="worker-1", claim_idle_s=3600)
    await again.recover(lambda e, entry: got.append((e.data["turn"], entry.redelivered)))
    assert got == [(1, True), (2, True)]
    assert await pending(client, stream, "g") == 0


async def test_entries_of_a_dead_consumer_are_claimed_once_idle(client, prefix):
    stream = f"{prefix}:events"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await add(client, stream, finals(2))
    await client.xreadgroup("g", "dead", {stream: ">"}, count=10)
    got = []
    alive = StreamConsumer(client, stream=stream, group="g", consumer="alive", claim_idle_s=3600)
    await alive.recover(lambda e, _: got.append(e.data["turn"]))
    assert got == [] and alive.claimed == 0  # not idle long enough yet
    patient = StreamConsumer(client, stream=stream, group="g", consumer="alive", claim_idle_s=0.05)
    await asyncio.sleep(0.1)  # idle time only grows: the entries are now idle over 50 ms
    await patient.recover(lambda e, _: got.append(e.data["turn"]))
    assert got == [1, 2] and patient.claimed == 2
    assert await pending(client, stream, "g") == 0


async def test_run_handles_live_entries_and_stops_cleanly_while_blocked(client, prefix):
    stream = f"{prefix}:events"
    got = []
    consumer = StreamConsumer(REDIS_URL, stream=stream, group="g", consumer="a", block_ms=60_000)
    task = asyncio.create_task(consumer.run(lambda e, _: got.append(e.data["turn"])))
    await wait_for(lambda: consumer.running, 10, "the consumer to start")
    await wait_for(lambda: client.exists(stream), 10, "the group (and stream) to be created")
    await add(client, stream, finals(3))
    await wait_for(lambda: len(got) == 3, 10, lambda: f"3 events handled, got {got}")
    consumer.stop()
    await asyncio.wait_for(task, 10)  # returns long before the 60 s block would end
    await consumer.close()
    assert got == [1, 2, 3]
    assert await pending(client, stream, "g") == 0


async def test_async_handler_is_awaited_before_the_ack(client, prefix):
    stream = f"{prefix}:events"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await add(client, stream, finals(1))
    seen_pending = []

    async def handler(event, entry):
        seen_pending.append(await pending(client, stream, "g"))

    await StreamConsumer(client, stream=stream, group="g", consumer="a").poll(handler)
    assert seen_pending == [1]  # still pending while the handler ran
    assert await pending(client, stream, "g") == 0


async def test_writer_publishes_each_id_once_and_per_call(client, prefix):
    stream = f"{prefix}:assist"
    writer = StreamWriter(client, stream, "assist", per_call=True)
    assert await writer.publish("assist.suggestion", "call-1", "c1:000004:refund", {"text": "Offer a refund"})
    assert not await writer.publish("assist.suggestion", "call-1", "c1:000004:refund", {"text": "Offer a refund"})
    assert await writer.publish("assist.suggestion", "call-2", "c2:000002:refund", {"text": "Offer a refund"})
    assert writer.written == 2 and writer.duplicates == 1
    assert await client.xlen(stream) == 2
    rows = await read_call_events(client, stream, "call-1")
    assert len(rows) == 1
    event = rows[0][1]
    assert (event.type, event.event_id, event.call_id, event.data["text"]) == \
        ("assist.suggestion", "assist:c1:000004:refund", "call-1", "Offer a refund")
    assert await read_call_events(client, stream, "call-1", after=rows[0][0]) == []
    # and a consumer of the writer's stream reads them typed
    got = []
    reader = StreamConsumer(client, stream=stream, group="g", consumer="a", start="0",
                            decode=ConsumerEvent.from_fields, key=consumer_event_key)
    await reader.poll(lambda e, _: got.append(e.call_id))
    assert got == ["call-1", "call-2"]


def test_consumer_event_validation_names_the_field():
    with pytest.raises(EventError, match="call_id"):
        ConsumerEvent("assist.suggestion", "assist:x", "", "assist")
    with pytest.raises(EventError, match="schema"):
        ConsumerEvent.from_wire({"type": "x"})
    with pytest.raises(ValueError, match="start"):
        StreamConsumer(REDIS_URL, group="g", start="1-0")
