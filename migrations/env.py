"""Alembic environment for the Earshot store.

Run through ``earshot db upgrade|downgrade|current`` (gateway.store.migrate),
which builds the Alembic Config in code and passes the database URL (or an
open connection) in ``config.attributes``; no alembic.ini is needed.
"""

from __future__ import annotations

from typing import Any

from alembic import context

from gateway.store.db import make_engine
from gateway.store.models import Base

config = context.config
target_metadata = Base.metadata

# the full-text index objects are made by hand in the migrations (they are
# dialect-specific); autogenerate must neither drop nor recreate them
_FTS_NAMES = {"turns_fts", "turns_fts_data", "turns_fts_idx", "turns_fts_docsize", "turns_fts_config",
              "ix_turns_text_tsv", "text_tsv"}


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    return name not in _FTS_NAMES


def _configure(**kwargs: Any) -> None:
    context.configure(target_metadata=target_metadata, include_name=include_name, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _configure(connection=conn, render_as_batch=conn.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
