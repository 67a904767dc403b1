"""examples/agent_assist.py against the machine's Redis: customer finals in, suggestions out, once."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from examples._yaml import RulesError
from examples.agent_assist import PRODUCER, SUGGESTION, AgentAssist, load_knowledge
from gateway.consumer import StreamConsumer, StreamWriter, read_call_events
from gateway.events import CALL_ENDED, TURN_FINAL, CallInfo, EventFactory, Source
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
KNOWLEDGE = ROOT / "examples" / "agent_assist.yaml"


@pytest.fixture
async def client():
    c = aioredis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


def call(call_id: str, kind: str = "sip") -> EventFactory:
    return EventFactory(CallInfo(call_id, source=Source(kind, (("call_id", "x"),))))


def final(factory: EventFactory, text: str, *, leg: str = "caller", turn: int = 1, **extra):
    return factory.make(TURN_FINAL, {"turn": turn, "start_ms": 1000 * turn, "end_ms": 1000 * turn + 900,
                                     "text": text, **extra}, leg=leg)


async def run_once(client, prefix, events, assist=None):
    stream = f"{prefix}:events"
    for event in events:
        await client.xadd(stream, event.to_fields())
    writer = StreamWriter(client, f"{prefix}:assist", PRODUCER, per_call=True)
    assist = assist or AgentAssist(load_knowledge(KNOWLEDGE), writer)
    consumer = StreamConsumer(client, stream=stream, group="assist", consumer="a", start="0")
    await consumer.poll(assist)
    return assist


async def test_customer_finals_become_suggestions_on_the_assist_stream(client, prefix):
    sip = call("call-a")
    siprec = call("call-b", "siprec")
    events = [
        final(sip, "Hi, I was charged twice on my card."),  # no role: a directly answered call's caller
        final(siprec, "I want a refund please", leg="leg-2", role="agent"),  # the agent said it: nothing
        final(siprec, "Can I cancel my subscription today?", leg="leg-1", role="customer", turn=2),
        final(sip, "Also I forgot my password", turn=2),
    ]
    await run_once(client, prefix, events)
    rows = [(e.call_id, e.data["suggestion"], e.data["matched"]) for _, e in
            await read_call_events(client, f"{prefix}:assist", "call-a")]
    assert rows == [("call-a", "refund", "charged twice"), ("call-a", "password", "forgot my password")]
    (b,) = await read_call_events(client, f"{prefix}:assist", "call-b")
    event = b[1]
    assert (event.type, event.data["suggestion"], event.data["matched"], event.data["leg"]) == \
        (SUGGESTION, "cancel", "cancel + subscription", "leg-1")
    assert event.event_id == f"assist:{events[2].event_id}:cancel"
    assert event.data["link"] == "https://kb.example.com/retention"
    assert await client.xlen(f"{prefix}:assist") == 3


async def test_a_final_handled_twice_suggests_once(client, prefix):
    sip = call("call-c")
    event = final(sip, "I would like my money back")
    await run_once(client, prefix, [event])
    # a restarted assistant (fresh memory) reading the same final again, e.g. after a crash before the ack
    writer = StreamWriter(client, f"{prefix}:assist", PRODUCER, per_call=True)
    again = AgentAssist(load_knowledge(KNOWLEDGE), writer)
    from gateway.consumer import Entry

    await again(event, Entry(f"{prefix}:events", "1-0", redelivered=True))
    assert writer.duplicates == 1 and again.published == 0
    assert await client.xlen(f"{prefix}:assist") == 1


async def test_one_card_per_suggestion_per_call_until_it_ends(client, prefix):
    sip = call("call-d")
    events = [final(sip, "refund", turn=1), final(sip, "a refund again", turn=2)]
    assist = await run_once(client, prefix, events)
    assert assist.published == 1
    await assist(sip.make(CALL_ENDED, {"reason": "bye"}), None)
    assert "call-d" not in assist._shown


@pytest.mark.parametrize(("text", "message"), [
    ("suggestions:\n  - id: a\n    text: t\n", "line 2: suggestions[0].phrases: give phrases or keywords"),
    ("suggestions:\n  - id: a\n    phrases: [x]\n", "line 2: suggestions[0].text: missing"),
    ("suggestions:\n  - id: a\n    phrases: [x]\n    text: t\n    link: ftp://x\n",
     "line 5: suggestions[0].link: does not look right"),
    ("suggestions:\n  - id: a\n    phrases: [x]\n    text: t\n  - id: a\n    phrases: [y]\n    text: u\n",
     "line 5: suggestions[1].id: 'a' is used twice"),
    ("suggestions:\n  - id: a\n    phrase: [x]\n    text: t\n", "line 3: suggestions[0].phrase: unknown field"),
    ("suggestions: [\n", "not valid YAML"),
    ("other: 1\n", "line 1: other: unknown field"),
])
def test_knowledge_errors_name_file_line_and_field(tmp_path, text, message):
    path = tmp_path / "kb.yaml"
    path.write_text(text)
    with pytest.raises(RulesError) as info:
        load_knowledge(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_matching_is_by_whole_words():
    assist = AgentAssist(load_knowledge(KNOWLEDGE), None)  # type: ignore[arg-type]
    assert assist.suggest("the refunds desk") == []  # "refund" is not "refunds"
    assert [s.id for s, _ in assist.suggest("REFUND!")] == ["refund"]
    assert [s.id for s, _ in assist.suggest("subscription: I'd like to cancel")] == ["cancel"]
