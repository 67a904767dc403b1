"""Routing: where a caller should go, from what they say first (docs/consumers.md).

Reads Earshot's events with a consumer group, classifies the caller's first
``first_turns`` finals by keyword rules (``routing.yaml``: the first rule with a
keyword heard wins; none by then: ``default``), publishes a ``routing.decision``
event on its own stream (``earshot:routing``) and, when Earshot answered the call
itself (``source.kind`` ``sip``: not a SIPREC fork of someone else's call), sends a
``transfer`` command to the call-control stream (``earshot:control``); Earshot then
REFERs the caller to the destination and answers on ``earshot:control:results``.

One decision per call: the decision's event id is ``routing:<call_id>`` and the
command id ``route-<call_id>``, both taken once (the writer's and the gateway's
idempotency), so a restart that re-reads the call's turns decides nothing twice.

    .venv/bin/python -m examples.routing --rules examples/routing.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from examples._yaml import RulesError, contains_phrase, load, normalize
from gateway.callcontrol import parse_command
from gateway.consumer import Entry, StreamConsumer, StreamWriter, is_customer
from gateway.events import CALL_ENDED, TURN_FINAL, Event

log = logging.getLogger("earshot.routing")

DECISION = "routing.decision"
PRODUCER = "routing"
SIP_URI = r"^sips?:[^\s<>\"]+$"
MAX_CALLS = 10_000


@dataclass(frozen=True)
class Route:
    name: str
    keywords: tuple[str, ...]
    destination: str


@dataclass(frozen=True)
class Rules:
    routes: tuple[Route, ...]
    first_turns: int = 2
    default: str = ""  # no destination: undecided calls stay where they are

    def classify(self, text: str) -> tuple[Route, str] | None:
        normalized = normalize(text)
        for route in self.routes:
            for keyword in route.keywords:
                if contains_phrase(normalized, keyword):
                    return route, keyword
        return None


def load_rules(path: str | Path) -> Rules:
    """The rules file; :class:`RulesError` names file, line and field."""
    root = load(path)
    root.check_keys({"routes", "first_turns", "default"})
    routes = []
    for node in root.children("routes"):
        node.check_keys({"name", "keywords", "destination"})
        keywords = node.words("keywords")
        if not keywords:
            node.fail("keywords", "missing")
        routes.append(Route(node.text("name"), keywords, node.text("destination", pattern=SIP_URI)))
    return Rules(tuple(routes), root.number("first_turns", 2, 1, 20),
                 root.text("default", required=False, pattern=SIP_URI))


@dataclass
class _CallState:
    turns: list[str] = field(default_factory=list)
    decided: bool = False


class Router:
    """The handler: the caller's first finals in, one decision (and a transfer command) out."""

    def __init__(self, rules: Rules, writer: StreamWriter, redis: aioredis.Redis, control_stream: str) -> None:
        self.rules = rules
        self.writer = writer
        self.redis = redis
        self.control_stream = control_stream
        self._calls: OrderedDict[str, _CallState] = OrderedDict()
        self.decisions = 0
        self.commands = 0

    async def __call__(self, event: Event, entry: Entry) -> None:
        if event.type == CALL_ENDED:
            self._calls.pop(event.call_id, None)
            return
        if event.type != TURN_FINAL or not is_customer(event) or not event.payload.text:  # type: ignore
            return
        state = self._calls.setdefault(event.call_id, _CallState())
        self._calls.move_to_end(event.call_id)
        while len(self._calls) > MAX_CALLS:
            self._calls.popitem(last=False)
        if state.decided:
            return
        state.turns.append(event.payload.text)  # type: ignore[union-attr]
        hit = self.rules.classify(event.payload.text)  # type: ignore[union-attr]
        if hit is not None:
            route, keyword = hit
            await self._decide(event, state, route.name, route.destination, keyword)
        elif len(state.turns) >= self.rules.first_turns:
            await self._decide(event, state, "default", self.rules.default, "")

    async def _decide(self, event: Event, state: _CallState, rule: str, destination: str, keyword: str) -> None:
        state.decided = True
        direct = event.source.kind == "sip"  # answered by Earshot; a SIPREC fork is someone else's call
        data = {"rule": rule, "destination": destination, "matched": keyword, "turns": len(state.turns),
                "turn_event_id": event.event_id, "transfer": bool(destination) and direct}
        if await self.writer.publish(DECISION, event.call_id, event.call_id, data):
            self.decisions += 1
            log.info("call %s: route %s -> %s (heard %r)", event.call_id, rule, destination or "nowhere", keyword)
        if destination and direct:
            command = {"command_id": f"route-{event.call_id}", "call_id": event.call_id, "action": "transfer",
                       "target": destination}
            parse_command(command)  # the gateway would refuse what fails here: fail here, naming the field
            await self.redis.xadd(self.control_stream, command)
            self.commands += 1


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", default=str(Path(__file__).with_suffix(".yaml")))
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="earshot", help="Earshot's stream_prefix")
    parser.add_argument("--group", default="routing")
    parser.add_argument("--consumer", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        rules = load_rules(args.rules)
    except RulesError as exc:
        raise SystemExit(str(exc)) from None
    client = aioredis.Redis.from_url(args.redis, socket_connect_timeout=2, socket_timeout=10)
    writer = StreamWriter(client, f"{args.prefix}:routing", PRODUCER)
    consumer: StreamConsumer[Event] = StreamConsumer(client, stream=f"{args.prefix}:events", group=args.group,
                                                     consumer=args.consumer)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, consumer.stop)
    log.info("routing: %d rules, reading %s", len(rules.routes), consumer.stream)
    try:
        await consumer.run(Router(rules, writer, client, f"{args.prefix}:control"))
    finally:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
