import uuid

import pytest
from sqlalchemy import func, select

from gateway.persister import parse_entry, store_events
from gateway.store.models import Call, Turn
from gateway.store.page import QueryError
from gateway.store.search import fts5_query, search_calls, search_terms, search_turns, tsquery
from tests.pg_server import engine, pg_store_url, prompt_texts, recorded_call, session, store_url  # noqa: F401


def store(session, events) -> None:
    entries = [parse_entry(f"{i + 1}-0", e.to_fields()) for i, e in enumerate(events)]
    store_events(session, entries)
    session.commit()


def word() -> str:
    """A word no other test's transcript has (the PostgreSQL database is shared by a module)."""
    return "zq" + uuid.uuid4().hex[:10]


def test_finds_a_call_by_a_word_of_its_transcript(session):
    marker = word()
    texts = prompt_texts()
    target = recorded_call([texts[3], f"Your refund request {marker} was approved.", texts[4]])
    other = recorded_call([texts[10], texts[11]])
    store(session, target + other)
    call_id = target[0].call.call_id

    calls = search_calls(session, marker)
    assert [c.call_id for c in calls.items] == [call_id] and calls.total == 1
    turns = search_turns(session, marker.upper())  # case-insensitive
    assert [(t.call_id, t.turn) for t in turns.items] == [(call_id, 2)]
    assert turns.items[0].call.call_id == call_id  # the call comes along
    assert turns.items[0].text == f"Your refund request {marker} was approved."
    # words of three letters or more match as prefixes; all words must be in the turn
    assert search_calls(session, f"refun {marker[:8]}").total == 1
    assert search_calls(session, f"{marker} approved").total == 1
    assert search_calls(session, f"{marker} declined").total == 0


def test_only_final_text_is_searchable_and_a_final_replaces_its_partials(session):
    heard, said = word(), word()
    events = recorded_call([f"please {heard} hold"], partials=0, ended=False)
    live = [e for e in events]
    call_id = events[0].call.call_id
    # a live turn: partials only
    from gateway.events import TURN_PARTIAL, EventFactory

    factory = EventFactory(events[0].call)
    factory._number = 100
    partial = factory.make(TURN_PARTIAL, {"turn": 9, "partial": 1, "start_ms": 0, "end_ms": 900,
                                          "text": f"i think {said}"}, leg="caller")
    store(session, live[:1] + [partial])
    assert search_calls(session, said).total == 0  # partial text is not indexed
    store(session, live[1:])
    assert search_calls(session, heard).total == 1
    turn = session.scalar(select(Turn).where(Turn.call_id == call_id, Turn.turn == 9))
    assert turn.final is False and turn.partial_text == f"i think {said}"
    final = factory.make("turn.final", {"turn": 9, "start_ms": 0, "end_ms": 1200, "text": "I think so.",
                                       "reason": "silence", "partials": 1, "language": "en"}, leg="caller")
    store(session, [final])
    session.expire_all()
    turn = session.scalar(select(Turn).where(Turn.call_id == call_id, Turn.turn == 9))
    assert turn.final and turn.text == "I think so." and turn.partial_text is None
    assert search_calls(session, said).total == 0
    assert [t.call_id for t in search_turns(session, "think so", limit=1000).items].count(call_id) == 1
    # a corrected final for the same turn replaces the indexed text
    fixed = word()
    store(session, [factory.make("turn.final", {"turn": 9, "start_ms": 0, "end_ms": 1200, "text": f"I {fixed}.",
                                                "reason": "silence", "partials": 1}, leg="caller")])
    assert [t.call_id for t in search_turns(session, fixed).items] == [call_id]
    assert call_id not in [t.call_id for t in search_turns(session, "think so", limit=1000).items]


HOSTILE = [
    '"', "'", '""', "''", "*", "-", "^", ":", "(", ")", "AND", "OR", "NOT", "NEAR", "NEAR(a b, 2)",
    "a:*", "!", "&", "|", "<->", "\\", "%", "_", ";", "--", "/*", "*/",
    "'; DROP TABLE calls; --", '" OR 1=1 --', "refund\x00", "col:refund", "{text}: refund", "^refund",
    "refund*", "(refund", "refund)", '"refund', "refund'", "refund' OR '1'='1", "!refund", "refund & | !",
    "text_tsv @@ 'x'", "refund\\", "ref%und", "ref_und",
]


def expected_match(query: str, text: str) -> bool:
    """The oracle: every word of the query is a word of the text (or its prefix, from 3 letters)."""
    words = search_terms(text)
    return all(any(w == t or (len(t) >= 3 and w.startswith(t)) for w in words) for t in search_terms(query))


def test_hostile_queries_are_plain_words(session):
    marker = word()
    text = f"I would like a refund {marker} for order 1234, or else."
    events = recorded_call([text])
    store(session, events)
    calls_before = session.scalar(select(func.count()).select_from(Call))
    matched = 0
    for query in HOSTILE:
        assert search_calls(session, query).total >= 0  # never raises
        assert search_turns(session, query).total >= 0
        found = [c.call_id for c in search_calls(session, f"{query} {marker}").items]
        expected = expected_match(f"{query} {marker}", text)
        assert found == ([events[0].call.call_id] if expected else []), (query, search_terms(query))
        matched += expected
    assert 10 < matched < len(HOSTILE)  # the oracle says yes and no
    assert session.scalar(select(func.count()).select_from(Call)) == calls_before


def test_operators_in_a_query_do_not_widen_or_narrow_it(session):
    marker = word()
    events = recorded_call([f"I would like a refund {marker} for order 1234."])
    store(session, events)
    call_id = events[0].call.call_id
    for query in (f'"{marker}', f"{marker}*", f"({marker})", f"{marker}:*", f"!{marker}", f"-{marker}",
                  f"NEAR({marker})", f"{marker}' OR '1'='1", f"{marker}; DROP TABLE turns; --"):
        found = [c.call_id for c in search_calls(session, query).items]
        expected = [call_id] if set(search_terms(query)) <= {marker, "near"} else []
        if "near" in search_terms(query):
            expected = []  # 'near' is a plain word, and this transcript does not have it
        assert found == expected, query
    assert search_calls(session, f"{marker} OR nothingelse").total == 0  # OR is a word, not an operator
    assert search_calls(session, f"{marker} NOT refund").total == 0


def test_query_building_quotes_every_term():
    assert search_terms('Hello, "World"! hello AND x_y café') == ["hello", "world", "and", "x", "y", "café"]
    assert fts5_query(["refund", "on"]) == '"refund"* AND "on"'
    assert tsquery(["refund", "on"]) == "'refund':* & 'on'"
    assert search_terms("'; -- */ ") == [] and search_terms(None) == []  # type: ignore[arg-type]
    assert len(search_terms(" ".join(f"w{i}" for i in range(100)))) == 16


def test_accents_and_case(session):
    marker = word()
    store(session, recorded_call([f"Un café {marker} s'il vous plaît."]))
    assert search_calls(session, f"CAFÉ {marker}").total == 1
    assert search_calls(session, f"plaît {marker}").total == 1


def test_empty_query_and_paging(session):
    marker = word()
    events = []
    for i in range(5):
        events += recorded_call([f"Ticket {marker} number {i}."], start=1_700_000_000.0 + i * 60)
    store(session, events)
    assert search_calls(session, " !!! ").total == 0
    pages = [search_calls(session, marker, limit=2, offset=o) for o in (0, 2, 4)]
    ids = [c.call_id for p in pages for c in p.items]
    assert len(ids) == 5 == len(set(ids)) and pages[0].total == 5
    assert pages[0].has_more and not pages[2].has_more
    started = [c.started_at for p in pages for c in p.items]
    assert started == sorted(started, reverse=True)  # newest first
    assert [t.text for t in search_turns(session, marker, limit=5).items] == [
        f"Ticket {marker} number {i}." for i in reversed(range(5))]
    with pytest.raises(QueryError):
        search_calls(session, marker, limit=0)
    with pytest.raises(QueryError):
        search_turns(session, marker, offset=-1)
