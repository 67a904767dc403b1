"""Schema migrations (Alembic) driven from code: ``earshot db upgrade|downgrade|current``.

The Alembic Config is built here, pointing at the repository's ``migrations/``
directory, so no alembic.ini is needed. The URL travels in
``config.attributes`` rather than the ini options, where ``%`` in a password
would be taken for interpolation.
"""

from __future__ import annotations

import logging
from pathlib import Path

# Alembic logs its plugin set-up and every step at INFO on each start; the gateway and the CLI
# report the outcome themselves, so only its warnings get through (unless configured otherwise).
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import Engine  # noqa: E402

from .db import make_engine, parse_url  # noqa: E402

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class SchemaError(RuntimeError):
    """The database schema is missing or not at the version this code expects."""


def alembic_config(database_url: str | None = None) -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise SchemaError(f"migrations not found in {MIGRATIONS_DIR}: run earshot from its source tree")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url is not None:
        parse_url(database_url)  # a clear error before Alembic's
        config.attributes["database_url"] = database_url
    return config


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise SchemaError(f"migrations have {len(heads)} heads; merge them")
    return heads[0]


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def current(database_url: str) -> str | None:
    engine = make_engine(database_url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaError` unless the database is at the head revision.

    Without the migrations directory (an installed package without the source
    tree) the head is unknown, and any migrated schema is accepted.
    """
    found = current_revision(engine)
    expected = head_revision() if (MIGRATIONS_DIR / "env.py").is_file() else found
    if found is None or found != expected:
        state = "has no Earshot schema" if found is None else f"is at revision {found}, not {expected}"
        raise SchemaError(f"the database {state}: run `earshot db upgrade`")
