"""Full-text search over final transcripts, the same on SQLite and PostgreSQL.

SQLite has an FTS5 table (``turns_fts``, external content over ``turns.text``)
and PostgreSQL a generated ``tsvector`` column (``turns.text_tsv``, 'simple'
configuration); both lower-case and split on non-alphanumerics, without
stemming. A query is never handed to either engine's query language as typed:
it is cut into words (letters and digits only), each word is quoted, and the
words are ANDed, so quotes, operators (``AND``, ``NEAR``, ``|``, ``!``,
``*``, ``:``) and SQL metacharacters in user input are plain text, and the
query string itself is a bound parameter. Words of three characters or more
match as prefixes ("refund" finds "refunds"), which also hides the lack of
stemming. All words must occur in the same turn.
"""

from __future__ import annotations

import re

from sqlalchemy import ColumnElement, Select, func, literal_column, select, text
from sqlalchemy.orm import Session, contains_eager

from .models import Call, Turn
from .page import Page, check_paging

MAX_TERMS = 16
MAX_TERM_LENGTH = 64
PREFIX_MIN_LENGTH = 3

_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script


def search_terms(query: str) -> list[str]:
    """The words of a user query, lower-cased, deduplicated, in order."""
    if not isinstance(query, str):
        return []
    words: list[str] = []
    for word in _WORD.findall(query.lower()):
        word = word[:MAX_TERM_LENGTH]
        if word not in words:
            words.append(word)
        if len(words) == MAX_TERMS:
            break
    return words


def fts5_query(terms: list[str]) -> str:
    """An FTS5 MATCH expression: every term a quoted string, ANDed."""
    parts = []
    for term in terms:
        quoted = '"' + term.replace('"', '""') + '"'
        parts.append(quoted + "*" if len(term) >= PREFIX_MIN_LENGTH else quoted)
    return " AND ".join(parts)


def tsquery(terms: list[str]) -> str:
    """A to_tsquery() expression: every term a quoted lexeme, ANDed."""
    parts = []
    for term in terms:
        quoted = "'" + term.replace("\\", "\\\\").replace("'", "''") + "'"
        parts.append(quoted + ":*" if len(term) >= PREFIX_MIN_LENGTH else quoted)
    return " & ".join(parts)


def turn_matches(session: Session, terms: list[str]) -> ColumnElement[bool]:
    """A WHERE condition on :class:`Turn` true for turns whose final text has every term."""
    if not terms:
        raise ValueError("no search terms")
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        fts = select(literal_column("rowid")).select_from(text("turns_fts")).where(
            text("turns_fts MATCH :fts_query").bindparams(fts_query=fts5_query(terms)))
        return Turn.id.in_(fts)
    if dialect == "postgresql":
        return literal_column("turns.text_tsv").op("@@")(
            func.to_tsquery(literal_column("'simple'::regconfig"), tsquery(terms)))
    raise NotImplementedError(f"full-text search is not available on {dialect}")


def _page(session: Session, stmt: Select, count_stmt: Select, limit: int, offset: int) -> Page:
    total = session.scalar(count_stmt) or 0
    items = list(session.scalars(stmt.limit(limit).offset(offset)).unique()) if total > offset else []
    return Page(items=items, total=total, limit=limit, offset=offset)


def search_turns(session: Session, query: str, limit: int = 50, offset: int = 0) -> Page[Turn]:
    """Final turns matching ``query``, newest call first, in call order within a call.

    Each turn comes with its ``call`` loaded.
    """
    check_paging(limit, offset)
    terms = search_terms(query)
    if not terms:
        return Page(items=[], total=0, limit=limit, offset=offset)
    condition = turn_matches(session, terms)
    stmt = (select(Turn).join(Turn.call).options(contains_eager(Turn.call)).where(condition)
            .order_by(Call.started_at.desc(), Call.call_id.desc(), Turn.start_ms, Turn.leg, Turn.turn))
    count = select(func.count()).select_from(Turn).where(condition)
    return _page(session, stmt, count, limit, offset)


def search_calls(session: Session, query: str, limit: int = 50, offset: int = 0) -> Page[Call]:
    """Calls with at least one final turn matching ``query``, newest first."""
    check_paging(limit, offset)
    terms = search_terms(query)
    if not terms:
        return Page(items=[], total=0, limit=limit, offset=offset)
    condition = Call.call_id.in_(select(Turn.call_id).where(turn_matches(session, terms)))
    stmt = select(Call).where(condition).order_by(Call.started_at.desc(), Call.call_id.desc())
    count = select(func.count()).select_from(Call).where(condition)
    return _page(session, stmt, count, limit, offset)
