"""Agent assist: suggestions for the agent from what the customer says (docs/consumers.md).

Reads Earshot's events with a consumer group (:class:`gateway.consumer.StreamConsumer`),
matches every customer final against a YAML knowledge file (``agent_assist.yaml``:
phrases or keywords -> suggestion text and link) and publishes ``assist.suggestion``
events to its own stream (``earshot:assist``, and per call ``earshot:assist:call:<id>``,
which the dashboard's live call view shows beside the transcript).

Idempotent: a suggestion's event id is ``assist:<turn event_id>:<suggestion id>``, and
the writer publishes an id once, so a final handled twice (a restart between the
handler and the ack) suggests once. Each suggestion is shown once per call (the same
customer asking about refunds three times gets one card); that memory is in the process.

Run it beside a gateway::

    .venv/bin/python -m examples.agent_assist --knowledge examples/agent_assist.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from examples._yaml import RulesError, contains_phrase, load, normalize
from gateway.consumer import Entry, StreamConsumer, StreamWriter, is_customer
from gateway.events import CALL_ENDED, TURN_FINAL, Event

log = logging.getLogger("earshot.assist")

SUGGESTION = "assist.suggestion"
PRODUCER = "assist"
MAX_CALLS = 10_000  # calls whose shown suggestions are remembered


@dataclass(frozen=True)
class Suggestion:
    id: str
    text: str
    link: str = ""
    phrases: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()

    def match(self, normalized: str) -> str | None:
        """What in ``normalized`` (see :func:`examples._yaml.normalize`) triggered it, or None."""
        for phrase in self.phrases:
            if contains_phrase(normalized, phrase):
                return phrase
        if self.keywords and all(contains_phrase(normalized, k) for k in self.keywords):
            return " + ".join(self.keywords)
        return None


def load_knowledge(path: str | Path) -> list[Suggestion]:
    """The knowledge file; :class:`RulesError` names file, line and field."""
    root = load(path)
    root.check_keys({"suggestions"})
    out: list[Suggestion] = []
    seen: set[str] = set()
    for node in root.children("suggestions"):
        node.check_keys({"id", "phrases", "keywords", "text", "link"})
        sid = node.text("id", pattern=r"^[A-Za-z0-9._-]{1,64}$")
        if sid in seen:
            node.fail("id", f"{sid!r} is used twice", node.items["id"])
        seen.add(sid)
        phrases, keywords = node.words("phrases"), node.words("keywords")
        if not phrases and not keywords:
            node.fail("phrases", "give phrases or keywords (or both)")
        link = node.text("link", required=False, pattern=r"^https?://")
        out.append(Suggestion(sid, node.text("text"), link, phrases, keywords))
    return out


class AgentAssist:
    """The handler: customer finals in, suggestions out."""

    def __init__(self, knowledge: list[Suggestion], writer: StreamWriter) -> None:
        self.knowledge = knowledge
        self.writer = writer
        self._shown: OrderedDict[str, set[str]] = OrderedDict()  # call id -> suggestion ids shown
        self.published = 0

    def suggest(self, text: str) -> list[tuple[Suggestion, str]]:
        normalized = normalize(text)
        return [(s, hit) for s in self.knowledge if (hit := s.match(normalized)) is not None]

    async def __call__(self, event: Event, entry: Entry) -> None:
        if event.type == CALL_ENDED:
            self._shown.pop(event.call_id, None)
            return
        if event.type != TURN_FINAL or not is_customer(event):
            return
        text = event.payload.text  # type: ignore[union-attr]
        if not text:
            return
        shown = self._shown.setdefault(event.call_id, set())
        self._shown.move_to_end(event.call_id)
        while len(self._shown) > MAX_CALLS:
            self._shown.popitem(last=False)
        for suggestion, hit in self.suggest(text):
            if suggestion.id in shown:
                continue
            data = {"suggestion": suggestion.id, "text": suggestion.text, "matched": hit,
                    "turn_event_id": event.event_id, "leg": event.leg, "turn": event.payload.turn,  # type: ignore
                    "start_ms": event.payload.start_ms, "said": text[:500]}  # type: ignore[union-attr]
            if suggestion.link:
                data["link"] = suggestion.link
            if await self.writer.publish(SUGGESTION, event.call_id, f"{event.event_id}:{suggestion.id}", data):
                self.published += 1
                log.info("call %s: suggest %s (customer said %r)", event.call_id, suggestion.id, hit)
            shown.add(suggestion.id)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--knowledge", default=str(Path(__file__).with_suffix(".yaml")))
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="earshot", help="Earshot's stream_prefix")
    parser.add_argument("--group", default="agent-assist")
    parser.add_argument("--consumer", default=None, help="a stable name re-reads its pending entries at restart")
    parser.add_argument("--from-start", action="store_true", help="a new group reads the whole stream")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        knowledge = load_knowledge(args.knowledge)
    except RulesError as exc:
        raise SystemExit(str(exc)) from None
    client = aioredis.Redis.from_url(args.redis, socket_connect_timeout=2, socket_timeout=10)
    writer = StreamWriter(client, f"{args.prefix}:assist", PRODUCER, per_call=True)
    consumer: StreamConsumer[Event] = StreamConsumer(client, stream=f"{args.prefix}:events", group=args.group,
                                                     consumer=args.consumer, start="0" if args.from_start else "$")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, consumer.stop)
    log.info("agent assist: %d suggestions, reading %s as %s/%s", len(knowledge), consumer.stream, consumer.group,
             consumer.consumer)
    try:
        await consumer.run(AgentAssist(knowledge, writer))
    finally:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
