"""Read functions for the dashboard and API: call lists, one call, live calls.

Every list is a :class:`~gateway.store.page.Page` in a deterministic order
(newest call first, ties broken by call id), so paging never shows a row twice
or skips one while nothing changes. Arguments are checked and a bad one raises
:class:`~gateway.store.page.QueryError`; user text only ever reaches SQL as a
bound parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import ColumnElement, Select, and_, exists, func, literal_column, or_, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from ..events import SOURCE_KINDS
from .models import CALL_LIVE, CALL_STATUSES, Call, Dtmf, Leg, Turn
from .page import Page, QueryError, check_paging
from .search import search_terms, turn_matches

__all__ = ["CallDetail", "Page", "QueryError", "get_call", "list_calls", "live_calls"]


@dataclass
class CallDetail:
    call: Call
    legs: list[str]
    turns: list[Turn]  # by start time, then leg and turn number
    dtmf: list[Dtmf]  # by offset
    speakers: dict[str, Leg] = field(default_factory=dict)  # leg label -> its row (SIPREC: role, participant)

    def side(self, leg: str) -> str:
        """``customer``, ``agent`` or ``other``: the colour of a leg's turns in a two-speaker transcript."""
        return speaker_side(leg, getattr(self.speakers.get(leg), "role", None))

    @property
    def timeline(self) -> list[Turn | Dtmf]:
        """Turns and digits merged in call time (ms since answer)."""
        items: list[tuple[int, int, Turn | Dtmf]] = [(t.start_ms, 0, t) for t in self.turns]
        items += [(d.offset_ms, 1, d) for d in self.dtmf]
        items.sort(key=lambda item: (item[0], item[1]))
        return [item[2] for item in items]


def _aware(value: datetime | None, name: str) -> datetime | None:
    if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
        raise QueryError(f"{name} must be a timezone-aware datetime, got {value!r}")
    return value


def _has_tag(session: Session, tag: str) -> ColumnElement[bool]:
    if session.get_bind().dialect.name == "postgresql":
        return Call.tags.cast(JSONB).op("@>")(func.jsonb_build_array(tag))
    each = func.json_each(Call.tags).table_valued("value")
    return exists(select(literal_column("1")).select_from(each).where(each.c.value == tag))


def list_calls(
    session: Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    party: str | None = None,
    tag: str | None = None,
    status: str | None = None,
    text: str | None = None,
    source: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> Page[Call]:
    """Calls, newest first, filtered by every argument given.

    since/until: answer time in [since, until). party: case-insensitive
    substring of the From or To URI (numbers, names, hosts). tag: exact
    dialplan tag. status: ``live`` or ``ended``. text: full-text query over
    final transcripts (see :mod:`gateway.store.search`); a text with no
    searchable word is ignored. source: the kind of source (``sip``,
    ``realtime``, ``rest``, ``twilio``, ``webrtc``, ``siprec``).
    """
    check_paging(limit, offset)
    conditions: list[ColumnElement[bool]] = []
    if _aware(since, "since") is not None:
        conditions.append(Call.started_at >= since)
    if _aware(until, "until") is not None:
        conditions.append(Call.started_at < until)
    if party:
        if not isinstance(party, str):
            raise QueryError(f"party must be text, got {party!r}")
        needle = party.strip().lower()
        conditions.append(or_(func.lower(Call.from_uri).contains(needle, autoescape=True),
                              func.lower(Call.to_uri).contains(needle, autoescape=True)))
    if tag:
        if not isinstance(tag, str):
            raise QueryError(f"tag must be text, got {tag!r}")
        conditions.append(_has_tag(session, tag))
    if status:
        if status not in CALL_STATUSES:
            raise QueryError(f"status must be one of {', '.join(CALL_STATUSES)}, got {status!r}")
        conditions.append(Call.status == status)
    if source:
        if source not in SOURCE_KINDS:
            raise QueryError(f"source must be one of {', '.join(SOURCE_KINDS)}, got {source!r}")
        conditions.append(Call.source_kind == source)
    if text:
        terms = search_terms(text)
        if terms:
            conditions.append(Call.call_id.in_(select(Turn.call_id).where(turn_matches(session, terms))))
    where = and_(*conditions) if conditions else None
    stmt: Select = select(Call).order_by(Call.started_at.desc(), Call.call_id.desc())
    count: Select = select(func.count()).select_from(Call)
    if where is not None:
        stmt, count = stmt.where(where), count.where(where)
    total = session.scalar(count) or 0
    items = list(session.scalars(stmt.limit(limit).offset(offset))) if total > offset else []
    return Page(items=items, total=total, limit=limit, offset=offset)


def live_calls(session: Session, *, limit: int = 100, offset: int = 0) -> Page[Call]:
    """Calls still up (no call.ended stored yet), newest first."""
    return list_calls(session, status=CALL_LIVE, limit=limit, offset=offset)


def get_call(session: Session, call_id: str) -> CallDetail | None:
    """One call with its legs, turns (live partial text included) and digits; None if unknown."""
    if not isinstance(call_id, str) or not call_id or len(call_id) > 64:
        return None
    call = session.get(Call, call_id)
    if call is None:
        return None
    rows = list(session.scalars(select(Leg).where(Leg.call_id == call_id).order_by(Leg.label)))
    legs = [row.label for row in rows]
    turns = list(session.scalars(
        select(Turn).where(Turn.call_id == call_id).order_by(Turn.start_ms, Turn.leg, Turn.turn)))
    digits = list(session.scalars(select(Dtmf).where(Dtmf.call_id == call_id).order_by(Dtmf.offset_ms, Dtmf.id)))
    return CallDetail(call=call, legs=legs, turns=turns, dtmf=digits, speakers={row.label: row for row in rows})


def speaker_side(leg: str, role: str | None) -> str:
    """A SIPREC leg's role decides its side; without one, the leg names Earshot gives
    (``caller``, ``agent``: SIPREC and Twilio) do. As earshot.js ``speakerSide``."""
    if role in ("customer", "agent"):
        return role
    return {"caller": "customer", "agent": "agent"}.get(leg, "other")
