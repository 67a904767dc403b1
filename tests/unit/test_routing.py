"""examples/routing.py against the machine's Redis: first turns classified, one decision, a transfer command."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from examples._yaml import RulesError
from examples.routing import PRODUCER, Router, load_rules
from gateway.callcontrol import parse_command
from gateway.consumer import ConsumerEvent, StreamConsumer, StreamWriter
from gateway.events import TURN_FINAL, CallInfo, EventFactory, Source
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "examples" / "routing.yaml"


@pytest.fixture
async def client():
    c = aioredis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


def final(factory, text, turn, leg="caller", **extra):
    return factory.make(TURN_FINAL, {"turn": turn, "start_ms": 0, "end_ms": 1, "text": text, **extra}, leg=leg)


async def route(client, prefix, events):
    stream = f"{prefix}:events"
    for event in events:
        await client.xadd(stream, event.to_fields())
    router = Router(load_rules(RULES), StreamWriter(client, f"{prefix}:routing", PRODUCER), client,
                    f"{prefix}:control")
    await StreamConsumer(client, stream=stream, group="routing", consumer="r", start="0").poll(router)
    decisions = [ConsumerEvent.from_fields(f) for _, f in await client.xrange(f"{prefix}:routing")]
    commands = [parse_command(f) for _, f in await client.xrange(f"{prefix}:control")]
    return router, decisions, commands


async def test_keyword_in_first_turns_decides_and_sends_a_transfer(client, prefix):
    sip = EventFactory(CallInfo("call-1", source=Source("sip", (("call_id", "x"),))))
    events = [final(sip, "Hello there", 1), final(sip, "Password incorrect, I am locked out", 2),
              final(sip, "and my bill is wrong", 3)]
    _router, decisions, commands = await route(client, prefix, events)
    (decision,) = decisions
    assert (decision.type, decision.call_id, decision.data["rule"], decision.data["matched"],
            decision.data["turns"], decision.data["transfer"]) == \
        ("routing.decision", "call-1", "accounts", "password", 2, True)
    assert [(c.command_id, c.call_id, c.action, c.target) for c in commands] == \
        [("route-call-1", "call-1", "transfer", "sip:accounts@127.0.0.1:5090")]


async def test_no_keyword_by_first_turns_takes_the_default_and_siprec_is_not_transferred(client, prefix):
    siprec = EventFactory(CallInfo("call-2", source=Source("siprec", (("call_id", "y"),))))
    events = [final(siprec, "I need my bill", 1, leg="agent-leg", role="agent"),  # the agent: not classified
              final(siprec, "Hello", 1, leg="cust", role="customer"),
              final(siprec, "just a question", 2, leg="cust", role="customer")]
    _router, decisions, commands = await route(client, prefix, events)
    (decision,) = decisions
    assert (decision.data["rule"], decision.data["destination"], decision.data["transfer"]) == \
        ("default", "sip:general@127.0.0.1:5090", False)
    assert commands == []  # a SIPREC fork is someone else's call


@pytest.mark.parametrize(("text", "message"), [
    ("routes:\n  - name: a\n    keywords: [x]\n    destination: mailto:x\n", "line 4: routes[0].destination"),
    ("routes:\n  - name: a\n    destination: sip:a@b\n", "line 2: routes[0].keywords: missing"),
    ("first_turns: 0\nroutes:\n  - name: a\n    keywords: [x]\n    destination: sip:a@b\n", "line 1: first_turns"),
    ("routes: []\n", "line 1: routes: expected a non-empty list"),
])
def test_rules_errors_name_file_line_and_field(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value).startswith(f"{path} ") and message in str(info.value)
