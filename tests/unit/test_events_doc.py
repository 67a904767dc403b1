"""docs/events.md and gateway/events.py describe the same events: every field in the doc's
tables exists in the typed definitions, and every field of the definitions is in the doc."""

import json
import re
from pathlib import Path

import pytest

from gateway.events import (
    EVENT_TYPES,
    PAYLOADS,
    SCHEMA,
    SOURCE_IDS,
    SOURCE_KINDS,
    CallInfo,
    Event,
    EventFactory,
    Payload,
    Source,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def sections() -> dict[str, list[list[str]]]:
    """Each ``## heading``'s table rows (header and separator left out), cells split."""
    out: dict[str, list[list[str]]] = {}
    heading = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
            out[heading] = []
        elif heading and line.startswith("|") and not re.match(r"^\|[-| ]+\|$", line):
            out[heading].append([cell.strip() for cell in line.strip("|").split("|")])
    for rows in out.values():
        if rows:
            rows.pop(0)  # the table's header
    return out


def names(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


def documented(rows: list[list[str]]) -> set[str]:
    return set().union(*(names(row[0]) for row in rows)) if rows else set()


def expand(cls: type[Payload], doc: set[str]) -> set[str]:
    """A documented object covers its fields (``asr`` "as in turn.final"); a documented
    nested field implies its object (``confidence.avg_logprob`` -> ``confidence``)."""
    out = set(doc)
    for name in doc:
        out |= {n for n in cls.field_names() if n.startswith(name + ".")}
        if "." in name:
            out.add(name.rsplit(".", 1)[0])
    return out


def test_the_doc_names_the_schema_version():
    text = DOC.read_text(encoding="utf-8")
    assert text.splitlines()[0] == f"# Earshot events (schema `{SCHEMA}`)"
    assert f"| `schema` | string | `{SCHEMA}`" in text


@pytest.mark.parametrize("kind", EVENT_TYPES)
def test_each_event_types_table_matches_its_dataclass(kind):
    rows = sections().get(f"`{kind}`")
    assert rows, f"docs/events.md has no table under '## `{kind}`'"
    doc = documented(rows)
    code = PAYLOADS[kind].field_names()
    assert doc - code == set(), f"documented for {kind} but not in {PAYLOADS[kind].__name__}"
    assert code - expand(PAYLOADS[kind], doc) == set(), f"fields of {PAYLOADS[kind].__name__} missing in the doc"


def test_the_common_fields_are_what_every_event_carries():
    doc = documented(sections()["Common fields (every event)"])
    sip = EventFactory(CallInfo("c1", "sip-1", "sip:a@x", "sip:b@y", 0.0, ("t",)))
    other = EventFactory(CallInfo("c2", source=Source("rest", (("request_id", "r1"), ("filename", "a.wav")))))
    envelopes = []
    for factory in (sip, other):
        for event in (factory.make("call.started"), factory.make("dtmf", {"digit": "5"}, leg="caller")):
            envelopes.append(set(event.to_wire()) - set(event.data))
    sip_only = {"sip_call_id", "from", "to"}
    assert envelopes[1] == doc and envelopes[0] == doc - {"leg"}  # SIP: every common field (leg on leg events)
    assert envelopes[3] == doc - sip_only and envelopes[2] == doc - sip_only - {"leg"}  # other sources: no SIP fields


def test_the_source_table_lists_each_kind_and_its_ids():
    rows = sections()["`source`"]
    table = {next(iter(names(row[0]))): tuple(re.findall(r"`([^`]+)`", row[1])) for row in rows}
    assert set(table) == set(SOURCE_KINDS)
    assert table == SOURCE_IDS


def test_the_examples_are_valid_events_with_no_unknown_field():
    text = DOC.read_text(encoding="utf-8")
    examples = re.findall(r"```json\n(.*?)```", text, re.S)
    assert len(examples) >= 2
    for example in examples:
        event = Event.from_wire(json.loads(example))  # valid, and nothing in it is unknown:
        assert event.to_wire() == json.loads(example)
