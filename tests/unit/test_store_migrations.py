from datetime import datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from gateway.store import migrate
from gateway.store.db import DatabaseUrlError, make_engine, make_sessionmaker, parse_url
from gateway.store.models import Base, Call
from tests.pg_server import require_shared, scratch_database

TABLES = {"calls", "legs", "turns", "dtmf", "call_events", "users", "api_tokens", "web_revocations"}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    require_shared()
    with scratch_database() as url:
        yield url


def _fts_present(engine) -> bool:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            return conn.scalar(text("SELECT count(*) FROM sqlite_master WHERE name = 'turns_fts'")) == 1
        return "text_tsv" in {c["name"] for c in inspect(conn).get_columns("turns")}


def test_migrations_run_up_and_down_from_empty(empty_url):
    engine = make_engine(empty_url)
    try:
        assert migrate.current(empty_url) is None
        with pytest.raises(migrate.SchemaError, match="no Earshot schema"):
            migrate.check_schema(engine)

        migrate.upgrade(empty_url)
        assert migrate.current(empty_url) == migrate.head_revision()
        migrate.check_schema(engine)
        assert TABLES <= set(inspect(engine).get_table_names())
        assert _fts_present(engine)
        with engine.connect() as conn:  # the models and the migrations describe the same schema
            context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                             "include_name": _not_fts})
            assert compare_metadata(context, Base.metadata) == []

        migrate.downgrade(empty_url, "base")
        assert migrate.current(empty_url) is None
        engine.dispose()
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert not _fts_present_safe(engine)

        migrate.upgrade(empty_url)  # and up again over the downgraded database
        assert migrate.current(empty_url) == migrate.head_revision()
    finally:
        engine.dispose()


def _not_fts(name, type_, parent_names) -> bool:
    return not (name or "").startswith("turns_fts") and name not in ("text_tsv", "ix_turns_text_tsv")


def _fts_present_safe(engine) -> bool:
    if engine.dialect.name == "postgresql" and "turns" not in inspect(engine).get_table_names():
        return False
    return _fts_present(engine)


def test_sqlite_connections_use_wal_foreign_keys_and_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("PRAGMA journal_mode")) == "wal"
            assert conn.scalar(text("PRAGMA foreign_keys")) == 1
            assert conn.scalar(text("PRAGMA busy_timeout")) >= 1000
    finally:
        engine.dispose()


def test_timestamps_come_back_timezone_aware_utc(tmp_path):
    url = f"sqlite:///{tmp_path / 'tz.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    local = datetime(2026, 11, 24, 17, 2, 11, 482000, tzinfo=timezone(timedelta(hours=2)))
    with sessions() as s, s.begin():
        s.add(Call(call_id="tz", started_at=local, tags=[]))
    with sessions() as s:
        stored = s.get(Call, "tz").started_at
        assert stored == local and stored.utcoffset() == timedelta(0) and stored.hour == 15
    with sessions() as s, pytest.raises(Exception, match="naive datetime"):
        s.add(Call(call_id="naive", started_at=datetime(2026, 1, 1), tags=[]))
        s.flush()
    engine.dispose()


@pytest.mark.parametrize("url, message", [
    ("mysql://u@h/db", "unsupported database 'mysql'"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("not a url", "not a database URL"),
    ("postgresql+asyncpg://u@h/db", "driver 'asyncpg'"),
])
def test_unusable_database_urls_are_refused_clearly(url, message):
    with pytest.raises(DatabaseUrlError, match=message):
        parse_url(url)


def test_plain_postgresql_url_uses_psycopg3():
    assert parse_url("postgresql://u:secret@h/db").drivername == "postgresql+psycopg"


def test_0002_gives_calls_stored_before_it_the_sip_source(empty_url):
    migrate.upgrade(empty_url, "0001")
    engine = make_engine(empty_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO calls (call_id, sip_call_id, from_uri, to_uri, from_user, to_user, tags, status, "
                "started_at, turn_count, dtmf_count, updated_at) VALUES ('old', 'a84b', 'sip:a@x', 'sip:b@y', "
                "'a', 'b', '[]', 'ended', :t, 0, 0, :t)"), {"t": datetime(2026, 1, 1, tzinfo=timezone.utc)})
        migrate.upgrade(empty_url)
        assert "ix_calls_source_kind" in {i["name"] for i in inspect(engine).get_indexes("calls")}
        with make_sessionmaker(engine)() as s:
            old = s.get(Call, "old")
            assert (old.source_kind, old.source_ids, old.source_id_map) == ("sip", None, {"call_id": "a84b"})
        migrate.downgrade(empty_url, "0001")
        engine.dispose()
        assert not {"source_kind", "source_ids"} & {c["name"] for c in inspect(engine).get_columns("calls")}
        with engine.connect() as conn:  # the row outlived the round trip
            assert conn.scalar(text("SELECT sip_call_id FROM calls WHERE call_id = 'old'")) == "a84b"
    finally:
        engine.dispose()
