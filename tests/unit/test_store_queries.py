import uuid
from datetime import datetime, timezone

import pytest

from gateway.persister import parse_entry, store_events
from gateway.store.models import Dtmf, Turn
from gateway.store.page import QueryError
from gateway.store.queries import get_call, list_calls, live_calls
from tests.pg_server import engine, pg_store_url, prompt_texts, recorded_call, session, store_url  # noqa: F401

T0 = 1_800_000_000.0  # calls of this module start here (the PostgreSQL database is shared by the module)


def store(session, events) -> None:
    store_events(session, [parse_entry(f"{i + 1}-0", e.to_fields()) for i, e in enumerate(events)])
    session.commit()


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


@pytest.fixture
def calls(session):
    """Four calls in one hour of their own, one still live."""
    base = T0 + uuid.uuid4().int % 10_000 * 3600
    user = "u" + uuid.uuid4().hex[:8]
    texts = prompt_texts()
    made = [
        recorded_call(texts[0:3], start=base + 0, from_user=f"{user}15551230001", tags=("sales",), digits="1"),
        recorded_call(texts[3:5], start=base + 600, from_user=f"{user}15551230002", tags=("support", "vip")),
        recorded_call(texts[5:6], start=base + 1200, from_user="bob", to_user=f"{user}queue", tags=("support",)),
        recorded_call(texts[6:8], start=base + 1800, from_user=f"{user}15551239999", tags=("support",), ended=False),
    ]
    for events in made:
        store(session, events)
    return base, user, [events[0].call.call_id for events in made], made


def test_filters_combine_and_order_is_newest_first(session, calls):
    base, user, ids, _ = calls
    window = {"since": at(base), "until": at(base + 3600)}
    assert [c.call_id for c in list_calls(session, **window).items] == ids[::-1]
    assert [c.call_id for c in list_calls(session, **window, party=user).items] == ids[::-1]
    assert [c.call_id for c in list_calls(session, **window, party=f"{user}1555123000").items] == [ids[1], ids[0]]
    assert [c.call_id for c in list_calls(session, party=f"{user.upper()}QUEUE").items] == [ids[2]]  # To, any case
    assert [c.call_id for c in list_calls(session, **window, tag="support").items] == [ids[3], ids[2], ids[1]]
    assert [c.call_id for c in list_calls(session, **window, tag="vip").items] == [ids[1]]
    assert list_calls(session, **window, tag="sup").total == 0  # tags match exactly
    assert [c.call_id for c in list_calls(session, **window, status="live").items] == [ids[3]]
    assert [c.call_id for c in list_calls(session, since=at(base + 600), until=at(base + 1200)).items] == [ids[1]]
    texts = prompt_texts()
    word = texts[5].split()[0]
    hits = list_calls(session, **window, text=texts[5], tag="support").items
    assert [c.call_id for c in hits] == [ids[2]], word
    assert list_calls(session, **window, text=" ?! ").total == 4  # no searchable word: no text filter


def test_party_filter_is_a_literal_substring(session, calls):
    base, user, ids, _ = calls
    window = {"since": at(base), "until": at(base + 3600)}
    assert list_calls(session, **window, party="%").total == 0  # '%' is not a wildcard
    assert list_calls(session, **window, party="@").total == 4
    assert list_calls(session, party=f"{user}_555").total == 0  # '_' is not a wildcard
    assert list_calls(session, party="' OR 1=1 --").total == 0


def test_paging_is_deterministic_for_equal_start_times(session):
    start = T0 - 10_000_000 + uuid.uuid4().int % 1000
    made = [recorded_call(["Same second."], start=start, tags=("tie",)) for _ in range(7)]
    for events in made:
        store(session, events)
    window = {"since": at(start), "until": at(start + 1)}
    pages = [list_calls(session, **window, limit=3, offset=o) for o in (0, 3, 6)]
    ids = [c.call_id for p in pages for c in p.items]
    assert sorted(ids, reverse=True) == ids and len(set(ids)) == 7  # ties broken by call id
    assert pages[0].total == 7 and pages[2].items and not pages[2].has_more


def test_call_detail_has_turns_and_digits_in_time_order(session, calls):
    _, _, ids, made = calls
    detail = get_call(session, ids[0])
    assert detail is not None
    assert detail.call.status == "ended" and detail.call.end_reason == "bye"
    assert detail.call.turn_count == 3 and detail.call.dtmf_count == 1
    assert detail.call.codec == "PCMU" and detail.call.dialplan_rule == "sales" and detail.call.tags == ["sales"]
    assert detail.call.rtp_stats["lost"] == 3
    assert detail.legs == ["caller"]
    assert [t.text for t in detail.turns] == prompt_texts()[0:3]
    assert [t.start_ms for t in detail.turns] == sorted(t.start_ms for t in detail.turns)
    assert all(t.final and t.partial_text is None and t.partial_count == 2 for t in detail.turns)
    turn = detail.turns[0]
    assert (turn.reason, turn.language, turn.asr_model, turn.speculative) == ("silence", "en", "tiny.en", True)
    assert (turn.avg_logprob, turn.no_speech_prob, turn.latency_ms) == (-0.21, 0.01, pytest.approx(512.3, abs=1))
    assert [d.digit for d in detail.dtmf] == ["1"]
    timeline = detail.timeline
    assert isinstance(timeline[-1], Dtmf) and all(isinstance(t, Turn) for t in timeline[:-1])
    assert detail.call.started_at == detail.call.answered_at == at(made[0][0].created_at)
    assert detail.call.ended_at.tzinfo is not None and detail.call.ended_at > detail.call.started_at
    assert get_call(session, "no-such-call") is None
    assert get_call(session, "x" * 500) is None


def test_live_calls_show_partial_text(session, calls):
    _, _, ids, _ = calls
    live = live_calls(session, limit=1000)
    assert ids[3] in {c.call_id for c in live.items} and ids[0] not in {c.call_id for c in live.items}
    assert all(c.status == "live" for c in live.items)


def test_bad_arguments_raise_query_errors(session):
    with pytest.raises(QueryError, match="timezone-aware"):
        list_calls(session, since=datetime(2026, 1, 1))
    with pytest.raises(QueryError, match="status"):
        list_calls(session, status="ringing")
    with pytest.raises(QueryError, match="limit"):
        list_calls(session, limit=10_000)
    with pytest.raises(QueryError, match="limit"):
        live_calls(session, limit=True)  # type: ignore[arg-type]
