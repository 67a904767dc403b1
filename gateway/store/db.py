"""Engine and sessions from one SQLAlchemy URL.

``sqlite:///earshot.db`` (the default: a file in the working directory) or
``postgresql+psycopg://user:password@host/dbname``. Nothing here connects: an
engine connects on first use, so the gateway starts while the database is down.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_DATABASE_URL = "sqlite:///earshot.db"
SUPPORTED_DIALECTS = ("sqlite", "postgresql")
SQLITE_BUSY_TIMEOUT_MS = 10_000


class DatabaseUrlError(ValueError):
    """The database URL cannot be used; the message says why."""


def parse_url(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUrlError(f"not a database URL ({exc})") from None
    if parsed.get_backend_name() not in SUPPORTED_DIALECTS:
        raise DatabaseUrlError(
            f"unsupported database {parsed.get_backend_name()!r}: use sqlite:///FILE or "
            "postgresql+psycopg://USER:PASSWORD@HOST/DBNAME")
    if parsed.get_backend_name() == "postgresql":
        driver = parsed.drivername.partition("+")[2]
        if driver not in ("psycopg", ""):
            raise DatabaseUrlError(f"PostgreSQL driver {driver!r} is not installed: use postgresql+psycopg://")
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, whatever SQLAlchemy's default
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise DatabaseUrlError("an in-memory SQLite database would vanish with the process: give a file")
    return parsed


def redact(url: str | URL) -> str:
    """The URL with its password hidden, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid database URL>"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL: the dashboard reads while the persister writes; NORMAL sync is
        # durable across process crashes in WAL mode and much faster than FULL
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for the store; SQLite gets WAL, foreign keys and a busy timeout."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)  # a restarted server leaves dead pooled connections
    kwargs.setdefault("connect_args", {"connect_timeout": 5})
    return create_engine(parsed, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: objects returned by a read function stay usable
    # after its transaction ends (the web renders them afterwards)
    return sessionmaker(engine, expire_on_commit=False)
