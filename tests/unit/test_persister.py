"""The persister against the machine's Redis and real SQLite / PostgreSQL stores."""

import asyncio
import json
import random

import pytest
import redis
import redis.asyncio as aioredis
from sqlalchemy import select

from gateway.events import TURN_FINAL, TURN_PARTIAL, EventFactory
from gateway.persister import Persister, PoisonEvent, parse_entry, store_events, uri_user
from gateway.publisher import Publisher
from gateway.store.models import Call, CallEvent, Dtmf, Leg, Turn
from tests.pg_server import (  # noqa: F401
    engine,
    interleave,
    pg_store_url,
    prompt_texts,
    recorded_call,
    session,
    store_url,
)
from tests.redis_server import RedisServer
from tests.waiting import wait_for

REDIS_URL = "redis://127.0.0.1:6379/0"


def make_persister(store_url, stream, **kwargs) -> Persister:
    kwargs.setdefault("block_ms", 100)
    kwargs.setdefault("backoff_max_s", 0.5)
    return Persister(REDIS_URL, store_url, stream=stream, **kwargs)


async def publish(prefix, events) -> None:
    publisher = Publisher(REDIS_URL, events_stream=f"{prefix}:events", call_stream=lambda c: f"{prefix}:call:{c}")
    await publisher.start()
    for event in events:
        publisher.publish(event)
    assert await publisher.flush(10)
    await publisher.close()


async def drained(stream: str, group: str = "earshot-persister", timeout: float = 20.0) -> None:
    """Wait until the group has been delivered every entry of the stream and acked them all."""
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    seen: dict = {}

    async def done() -> bool:
        seen["group"] = {g["name"]: g for g in await client.xinfo_groups(stream)}.get(group)
        seen["last"] = (await client.xinfo_stream(stream))["last-generated-id"]
        info = seen["group"]
        return bool(info and info["pending"] == 0 and info["last-delivered-id"] == seen["last"])

    try:
        await wait_for(done, timeout, lambda: f"{stream} to drain: group {seen.get('group')}, last {seen.get('last')}")
    finally:
        await client.aclose()


def snapshot(session) -> dict:
    """Everything the persister stored, in comparable form (no row ids or arrival times)."""
    session.expire_all()
    return {
        "calls": sorted((c.call_id, c.status, c.turn_count, c.dtmf_count, c.end_reason, c.duration_ms, c.codec,
                         c.from_user, c.started_at, c.answered_at, c.ended_at, json.dumps(c.rtp_stats, sort_keys=True),
                         tuple(c.tags)) for c in session.scalars(select(Call))),
        "legs": sorted((x.call_id, x.label) for x in session.scalars(select(Leg))),
        "turns": sorted((t.call_id, t.leg, t.turn, t.final, t.text, t.partial_text, t.partial_count, t.start_ms,
                         t.end_ms, t.reason, t.avg_logprob, t.speculative) for t in session.scalars(select(Turn))),
        "dtmf": sorted((d.call_id, d.digit, d.offset_ms, d.event_id) for d in session.scalars(select(Dtmf))),
        "events": sorted((e.event_id, e.type) for e in session.scalars(select(CallEvent))),
    }


def only(snap: dict, call_ids: set[str]) -> dict:
    return {k: [row for row in rows if row[0] in call_ids or (k == "events" and row[0].split(":")[0] in call_ids)]
            for k, rows in snap.items()}


async def test_a_recorded_stream_is_stored_exactly_once_despite_replays(store_url, session, prefix):
    texts = prompt_texts()
    calls = [recorded_call(texts[i * 4:i * 4 + 4], digits="12#"[: i % 4], start=1_750_000_000.0 + i * 30,
                           from_user=f"+1555000{i:04d}") for i in range(6)]
    events = interleave(calls)
    ids = {c[0].call.call_id for c in calls}
    stream = f"{prefix}:events"
    await publish(prefix, events)
    # a publish retried after a lost acknowledgement: the same events again, new entry ids
    await publish(prefix, [e for e in events if e.number % 3 == 0])

    persister = make_persister(store_url, stream, consumer="p1")
    await persister.start()
    await drained(stream)
    await persister.close()
    first = only(snapshot(session), ids)
    stored_events = [e for e in events if e.type != TURN_PARTIAL]
    assert first["events"] == sorted((e.event_id, e.type) for e in stored_events)
    assert len(first["calls"]) == 6 and all(c[1] == "ended" for c in first["calls"])
    assert len(first["turns"]) == 24 and all(t[3] and t[5] is None for t in first["turns"])
    assert sorted(t[4] for t in first["turns"]) == sorted(texts[:24])
    assert len(first["dtmf"]) == sum(len("12#"[: i % 4]) for i in range(6))
    assert {c[0]: c[2] for c in first["calls"]} == {c[0].call.call_id: 4 for c in calls}
    assert persister.duplicates > 0 and persister.poison == 0

    # the whole stream replayed, then delivered again by a restarted persister
    await publish(prefix, events)
    again = make_persister(store_url, stream, consumer="p2")
    await again.start()
    await drained(stream)
    await again.close()
    assert again.stored == 0 and again.duplicates == len(events)
    assert only(snapshot(session), ids) == first

    # entries delivered but never acknowledged: by this consumer before a crash,
    # and by a consumer that died
    await publish(prefix, events[:30])
    raw = redis.Redis.from_url(REDIS_URL)
    assert len(raw.xreadgroup("earshot-persister", "p3", {stream: ">"}, count=10)[0][1]) == 10
    assert len(raw.xreadgroup("earshot-persister", "dead", {stream: ">"}, count=20)[0][1]) == 20
    assert raw.xpending(stream, "earshot-persister")["pending"] == 30
    # part of the scenario, not a wait for something to happen: before the third persister
    # starts, the 30 entries must have been pending for longer than its claim_min_idle_ms
    # (0.1 s), and "dead" (like p1 and p2) silent for longer than forget_consumers_after_s (0.1 s)
    await asyncio.sleep(0.2)
    third = make_persister(store_url, stream, consumer="p3", claim_min_idle_ms=100, forget_consumers_after_s=0.1)
    await third.start()
    await drained(stream)
    await third.close()
    assert raw.xpending(stream, "earshot-persister")["pending"] == 0
    # consumers of earlier runs, with nothing pending any more, were removed
    assert [c["name"] for c in raw.xinfo_consumers(stream, "earshot-persister")] == [b"p3"]
    raw.close()
    assert third.acked == 30 and third.stored == 0
    assert only(snapshot(session), ids) == first


async def test_poison_entries_are_counted_acknowledged_and_never_block(store_url, session, prefix):
    stream = f"{prefix}:events"
    good = recorded_call(prompt_texts()[40:42])
    await publish(prefix, good[:3])
    base = json.loads(good[0].to_fields()["data"])
    poison = [
        {"nodata": "x"},
        {"data": "{not json"},
        {"data": b"\xff\xfe\x00"},
        {"data": json.dumps({**base, "schema": "earshot.event.v9"})},
        {"data": json.dumps({**base, "type": "call.exploded"})},
        {"data": json.dumps({**base, "event_id": base["call_id"] + ":999001", "type": TURN_FINAL, "leg": "caller",
                             "turn": "two", "start_ms": 0, "end_ms": 5})},
        {"data": '{"schema":"earshot.event.v1","type":"dtmf","duration_ms":NaN}'},
        {"data": json.dumps([1, 2, 3])},
        {"data": json.dumps({**base, "time": "yesterday"})},
        {"data": json.dumps({**base, "event_id": base["call_id"] + ":999002", "call_id": "c" * 500})},
    ]
    raw = redis.Redis.from_url(REDIS_URL)
    for fields in poison:
        raw.xadd(stream, fields)
    raw.close()
    await publish(prefix, good[3:])
    persister = make_persister(store_url, stream)
    await persister.start()
    await drained(stream)
    await persister.close()
    assert persister.poison == len(poison)
    assert persister.stored == len(good)
    call = session.get(Call, good[0].call.call_id)
    assert call.status == "ended" and call.turn_count == 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_out_of_order_events_end_in_the_same_state(session, seed):
    texts = prompt_texts()[50:53]
    in_order = recorded_call(texts, digits="9*", start=1_760_000_000.0 + seed)
    shuffled_call = recorded_call(texts, digits="9*", start=1_760_000_000.0 + seed)
    shuffled = list(shuffled_call)
    random.Random(seed).shuffle(shuffled)
    store_events(session, [parse_entry(f"{i}-1", e.to_fields()) for i, e in enumerate(in_order)])
    session.commit()
    for i, event in enumerate(shuffled):  # one transaction each
        store_events(session, [parse_entry(f"{i}-2", event.to_fields())])
        session.commit()
    a, b = in_order[0].call.call_id, shuffled_call[0].call.call_id

    def normalized(call_id: str) -> dict:
        snap = only(snapshot(session), {call_id})
        return {k: [tuple(call_id == v and "X" or (v.replace(call_id, "X") if isinstance(v, str) else v) for v in row)
                    for row in rows] for k, rows in snap.items()}

    assert normalized(a) == normalized(b)
    assert normalized(a)["calls"][0][2:4] == (3, 2)


def test_partials_update_live_text_and_never_override_a_final(session):
    call = recorded_call([], ended=False)
    factory = EventFactory(call[0].call)
    factory._number = 1
    p1 = factory.make(TURN_PARTIAL, {"turn": 1, "partial": 1, "start_ms": 100, "end_ms": 1100, "text": "hello"},
                      leg="caller")
    p2 = factory.make(TURN_PARTIAL, {"turn": 1, "partial": 2, "start_ms": 100, "end_ms": 2100,
                                     "text": "hello there"}, leg="caller")
    final = factory.make(TURN_FINAL, {"turn": 1, "start_ms": 100, "end_ms": 2500, "text": "Hello there, agent.",
                                      "reason": "silence", "partials": 2}, leg="caller")

    def apply(*events):
        result = store_events(session, [parse_entry("1-0", e.to_fields()) for e in events])
        session.commit()
        return result

    apply(call[0], p2)
    turn = session.scalar(select(Turn).where(Turn.call_id == factory.call.call_id))
    assert (turn.final, turn.partial_text, turn.text) == (False, "hello there", None)
    assert apply(p1).duplicates == 1  # an older partial changes nothing
    assert turn.partial_text == "hello there"
    apply(final, p2)
    session.refresh(turn)
    assert (turn.final, turn.partial_text, turn.text) == (True, None, "Hello there, agent.")


def test_parse_entry_reasons():
    event = recorded_call(["Hi."])[0]
    assert parse_entry(b"1-0", {k.encode(): v.encode() for k, v in event.to_fields().items()}).call_id == \
        event.call.call_id
    for fields, reason in [(None, "no longer in the stream"), ({b"x": b"1"}, "no 'data'"),
                           ({b"data": b"\xff"}, "not UTF-8"), ({b"data": b"[]"}, "not a JSON object"),
                           ({b"data": b'{"schema": "earshot.event.v1"}'}, "unknown event type")]:
        with pytest.raises(PoisonEvent, match=reason):
            parse_entry(b"1-0", fields)


def test_uri_user():
    assert uri_user("sip:alice@pbx.example") == "alice"
    assert uri_user("sips:+15551234@pbx;user=phone") == "+15551234"
    assert uri_user("tel:+15551234;phone-context=example.com") == "+15551234"
    assert uri_user("sip:pbx.example:5060") == ""
    assert uri_user('"Bob" <sip:1001@pbx>;tag=x') == "1001"


async def test_survives_a_redis_restart_that_loses_the_stream(tmp_path):
    from gateway.store import migrate

    url = f"sqlite:///{tmp_path / 'r.db'}"
    migrate.upgrade(url)
    server = RedisServer().start()
    try:
        stream = "t:events"
        publisher = Publisher(server.url, events_stream=stream, call_stream=lambda c: f"t:call:{c}")
        await publisher.start()
        persister = Persister(server.url, url, stream=stream, block_ms=100, backoff_max_s=0.3)
        await persister.start()
        first, second = recorded_call(["Before the outage."]), recorded_call(["After the outage."])
        for e in first:
            publisher.publish(e)
        assert await publisher.flush(5)
        await wait_for(lambda: persister.stored == len(first), 10,
                       lambda: f"the first call to be stored ({persister.stored} of {len(first)})")
        failures = persister.redis_failures
        server.stop()
        await wait_for(lambda: persister.redis_failures > failures and not persister.redis_ok, 10,
                       "the persister to notice that Redis is gone")
        server.start()  # an empty Redis: the stream and the group are gone
        for e in second:
            publisher.publish(e)
        assert await publisher.flush(10)
        await wait_for(lambda: persister.stored == len(first) + len(second), 20,
                       lambda: f"the second call to be stored ({persister.stored} of {len(first) + len(second)})")
        assert persister.stored == len(first) + len(second) and persister.redis_ok
        await persister.close()
        await publisher.close()
    finally:
        server.stop()
