"""The live board (sans-I/O) and the LiveHub against the machine's Redis (unique stream prefixes)."""

import asyncio
import time

import redis

from gateway.events import CALL_ENDED, CALL_STARTED, TURN_FINAL, TURN_PARTIAL
from gateway.publisher import Publisher
from gateway.web.live import OVERFLOW, RESET, BoardChange, LiveBoard, LiveHub, event_number
from tests.pg_server import prompt_texts, recorded_call
from tests.redis_server import RedisServer
from tests.waiting import wait_for

REDIS_URL = "redis://127.0.0.1:6379/0"


def dicts(events):
    return [e.to_dict() for e in events]


async def publish(prefix, events, url=REDIS_URL):
    publisher = Publisher(url, events_stream=f"{prefix}:events", call_stream=lambda c: f"{prefix}:call:{c}")
    await publisher.start()
    for event in events:
        publisher.publish(event)
    assert await publisher.flush(10)
    await publisher.close()


def make_hub(prefix, url=REDIS_URL, **kwargs):
    kwargs.setdefault("block_ms", 100)
    return LiveHub(url, events_stream=f"{prefix}:events", call_stream=lambda c: f"{prefix}:call:{c}", **kwargs)


async def drain(sub, count, timeout=10.0):
    items = []
    while len(items) < count:
        item = await sub.get(timeout)
        assert item is not None, f"got {len(items)} of {count}"
        items.append(item)
    return items


# -- LiveBoard


def test_board_follows_a_call_from_start_to_end():
    texts = prompt_texts()[:3]
    board = LiveBoard()
    events = dicts(recorded_call(texts, partials=1, digits="5"))
    changes = [board.apply(e) for e in events[:-1]]
    assert all(c is not None and c.kind == "call" for c in changes)
    (call,) = board.active()
    assert call.latest_text == texts[-1] and not call.latest_partial
    assert call.turns == 3 and call.from_uri == "sip:alice@pbx.example" and call.tags == ["support"]
    ended = board.apply(events[-1])
    assert ended.kind == "ended" and board.active() == []


def test_board_shows_partials_then_their_final():
    board = LiveBoard()
    events = dicts(recorded_call(["please hold while I try that extension"], partials=2, ended=False))
    board.apply(events[0])
    board.apply(events[1])
    call = board.calls[events[0]["call_id"]]
    assert call.latest_partial and call.latest_text == "please hold"
    board.apply(events[3])
    assert not call.latest_partial and call.latest_text == "please hold while I try that extension"


def test_board_ignores_duplicates_and_events_after_the_end():
    board = LiveBoard()
    events = dicts(recorded_call(["one two three", "four five six"], partials=0))
    for e in events:
        board.apply(e)
    assert board.active() == []
    # a retried publish re-delivers an earlier event after call.ended: the call must not come back
    assert board.apply(events[1]) is None and board.active() == []
    board2 = LiveBoard()
    board2.apply(events[0])
    board2.apply(events[1])
    assert board2.apply(events[1]) is None  # same event number
    assert board2.calls[events[0]["call_id"]].turns == 1


def test_board_joining_mid_call_estimates_the_answer_time():
    events = dicts(recorded_call(["hello there"], partials=0, ended=False))
    final = events[-1]
    board = LiveBoard()
    board.apply(final)  # call.started fell outside the window read
    call = board.calls[final["call_id"]]
    assert call.started_at < 1_700_000_000.0 + 1.0
    assert abs(call.started_at - (1_700_000_000.25 - final["end_ms"] / 1000)) < 1e-6


def test_board_survives_malformed_events():
    board = LiveBoard()
    for junk in ({}, {"call_id": 5, "type": "call.started"}, {"call_id": "x" * 200, "type": "call.started"},
                 {"call_id": "a", "type": TURN_FINAL, "turn": "1", "text": None},
                 {"call_id": "a b", "type": CALL_STARTED}, {"call_id": "ok", "type": "nonsense"}):
        board.apply(junk)
    assert all(c.call_id in ("a", "ok") for c in board.active())


def test_board_expires_calls_whose_gateway_died():
    board = LiveBoard(stale_after_s=3600)
    events = dicts(recorded_call(["hi"], partials=0, ended=False))
    board.apply(events[0])
    assert board.expire(1_700_000_000.0 + 3000) == []
    (gone,) = board.expire(1_700_000_000.0 + 4000)
    assert gone.kind == "ended" and board.active() == []


def test_event_number():
    assert event_number({"event_id": "abc:000042"}) == 42
    assert event_number({"event_id": "abc"}) == 0
    assert event_number({"event_id": 5}) == 0


# -- LiveHub against Redis


def live_call(texts, **kwargs):
    """A call's events stamped with the present time, as the gateway would publish them now."""
    return recorded_call(texts, start=time.time(), **kwargs)
async def test_hub_rebuilds_the_board_from_the_stream(prefix):
    texts = prompt_texts()
    done = live_call(texts[:2])
    up = live_call(texts[2:4], ended=False, from_user="bob")
    await publish(prefix, done + up)
    hub = make_hub(prefix)
    await hub.start()
    try:
        await asyncio.wait_for(hub.ready.wait(), 10)
        (call,) = hub.active()
        assert call.call_id == up[0].call.call_id and call.from_uri == "sip:bob@pbx.example"
        assert call.latest_text == texts[3] and call.turns == 2
        assert hub.redis_ok
    finally:
        await hub.close()


async def board_until_ended(sub, call_id, timeout=10.0):
    changes = []
    while not changes or changes[-1].kind != "ended":
        change = await sub.get(timeout)
        assert change is not None, f"no end after {[c.kind for c in changes]}"
        assert change.call_id == call_id
        changes.append(change)
    return changes


async def test_hub_fans_out_with_one_redis_reader(prefix):
    hub = make_hub(prefix, client_name=f"livehub-{prefix}")
    await hub.start()
    try:
        await asyncio.wait_for(hub.ready.wait(), 10)
        events = live_call(prompt_texts()[:3], partials=1)
        call_id = events[0].call.call_id
        boards = [hub.subscribe_board() for _ in range(100)]
        calls = [hub.subscribe(call_id) for _ in range(100)]
        others = [hub.subscribe("some-other-call") for _ in range(10)]
        await publish(prefix, events)
        for sub in calls:
            got = await drain(sub, len(events))
            assert [event_number(e) for e in got] == list(range(1, len(events) + 1))
        for sub in boards:
            await board_until_ended(sub, call_id)
            assert sub.pending == 0
        assert all(sub.queue.empty() for sub in others)
        client = redis.Redis.from_url(REDIS_URL)
        readers = [c for c in client.client_list() if c.get("name") == f"livehub-{prefix}"]
        client.close()
        assert len(readers) == 1  # 210 subscribers, one connection
        assert hub.subscribers == 210
        for sub in boards + calls + others:
            sub.close()
        assert hub.subscribers == 0
    finally:
        await hub.close()


async def test_slow_call_viewer_is_dropped_without_holding_back_the_others(prefix):
    hub = make_hub(prefix, queue_size=16)
    await hub.start()
    try:
        await asyncio.wait_for(hub.ready.wait(), 10)
        events = live_call(prompt_texts()[:10], partials=3)
        assert len(events) > 40
        call_id = events[0].call.call_id
        slow = hub.subscribe(call_id)  # never reads
        fast = hub.subscribe(call_id)
        received = []

        async def reader():
            while len(received) < len(events):
                item = await fast.get(10)
                assert item is not None and item is not OVERFLOW
                received.append(item)

        task = asyncio.create_task(reader())
        for i in range(0, len(events), 3):  # a call's pace: a few events at a time
            await publish(prefix, events[i:i + 3])
        await asyncio.wait_for(task, 15)
        assert [event_number(e) for e in received] == list(range(1, len(events) + 1))
        assert slow.overflowed and slow.closed
        assert await slow.get(1) is OVERFLOW
        assert slow.queue.empty()
        assert hub.stats.overflows == 1
        assert hub.subscribers == 1
    finally:
        await hub.close()


async def test_board_coalesces_a_burst_per_call_and_overflows_only_past_its_bound(prefix):
    hub = make_hub(prefix, max_board_pending=5)
    await hub.start()
    try:
        await asyncio.wait_for(hub.ready.wait(), 10)
        one_call = live_call(prompt_texts()[:10], partials=3, ended=False)
        patient = hub.subscribe_board()
        await publish(prefix, one_call)
        await wait_for(lambda: hub.stats.entries >= len(one_call), 10, "the hub to read the call")
        assert patient.pending == 1  # 40+ events, one pending update: the call's latest state
        change = await patient.get(1)
        assert change.kind == "call" and change.call.latest_text == prompt_texts()[9]
        many = [live_call(["hello"], ended=False, partials=0) for _ in range(6)]
        await publish(prefix, [e for call in many for e in call])
        await wait_for(lambda: patient.closed, 10, "the patient subscriber to be closed")
        assert patient.overflowed and await patient.get(1) is OVERFLOW
        fresh = hub.subscribe_board()
        assert not fresh.closed and len(hub.active()) == 7
    finally:
        await hub.close()


async def test_replay_then_follow_live(prefix):
    hub = make_hub(prefix)
    await hub.start()
    try:
        await asyncio.wait_for(hub.ready.wait(), 10)
        events = live_call(prompt_texts()[:4], partials=1)
        call_id = events[0].call.call_id
        first, rest = events[:5], events[5:]
        await publish(prefix, first)
        await wait_for(lambda: hub.stats.entries >= len(first), 10, "the hub to read the first call")
        sub = hub.subscribe(call_id)  # a supervisor opens the call mid-way
        replayed = await hub.replay(call_id)
        assert [event_number(e) for e in replayed] == [1, 2, 3, 4, 5]
        assert replayed[0]["type"] == CALL_STARTED and replayed[1]["type"] == TURN_PARTIAL
        await publish(prefix, rest)
        live = await drain(sub, len(rest))
        assert [event_number(e) for e in live] == list(range(6, len(events) + 1))
        assert live[-1]["type"] == CALL_ENDED
        assert await hub.replay("no-such-call") == []
        assert await hub.replay("bad id with spaces") == []
    finally:
        await hub.close()


async def test_hub_survives_a_redis_restart_that_lost_the_stream():
    server = RedisServer().start()
    prefix = "earshot-webtest-restart"
    hub = make_hub(prefix, url=server.url)
    try:
        await hub.start()
        await asyncio.wait_for(hub.ready.wait(), 10)
        board = hub.subscribe_board()
        before = live_call(["before the restart"], ended=False)
        await publish(prefix, before, url=server.url)
        await wait_for(lambda: len(hub.active()) == 1, 10, "the call on the board")
        port = server.port
        server.stop()
        await wait_for(lambda: not hub.redis_ok, 10, "the hub to notice Redis stopped")
        server = RedisServer(port).start()  # empty: the stream is gone
        await wait_for(lambda: hub.redis_ok, 20, "the hub to reconnect")
        after = live_call(["after the restart"], ended=False)
        await publish(prefix, after, url=server.url)
        await wait_for(lambda: [c.call_id for c in hub.active()] == [after[0].call.call_id], 20,
                       lambda: f"only the new call on the board: {[c.call_id for c in hub.active()]}")
        kinds = []
        while board.pending:
            item = await board.get(0)
            kinds.append(item.kind if isinstance(item, BoardChange) else item["type"])
        assert "status" in kinds and "snapshot" in kinds
        assert hub.stats.rebuilds >= 2
    finally:
        await hub.close()
        server.stop()


async def test_hub_starts_while_redis_is_down_and_close_ends_subscribers():
    hub = make_hub("earshot-webtest-down", url="redis://127.0.0.1:1/0")
    await hub.start()
    sub = hub.subscribe("x")
    await wait_for(lambda: hub.stats.redis_failures >= 1, 10, "the hub to fail to reach Redis")
    assert not hub.redis_ok
    await hub.close()
    assert await sub.get(1) is RESET
