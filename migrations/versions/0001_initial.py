"""Initial store: calls, legs, turns, dtmf, call_events, users, api_tokens and full-text search.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# SQLite: an external-content FTS5 table over turns.text, kept in sync by
# triggers. Only final text is indexed (text is NULL while a turn is live). One
# UPDATE trigger does delete-then-insert: FTS5 needs the old text to unindex it.
SQLITE_FTS = [
    "CREATE VIRTUAL TABLE turns_fts USING fts5("
    "text, content='turns', content_rowid='id', tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER turns_fts_insert AFTER INSERT ON turns WHEN new.text IS NOT NULL BEGIN "
    "INSERT INTO turns_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER turns_fts_delete AFTER DELETE ON turns WHEN old.text IS NOT NULL BEGIN "
    "INSERT INTO turns_fts(turns_fts, rowid, text) VALUES ('delete', old.id, old.text); END",
    "CREATE TRIGGER turns_fts_update AFTER UPDATE OF text ON turns BEGIN "
    "INSERT INTO turns_fts(turns_fts, rowid, text) SELECT 'delete', old.id, old.text WHERE old.text IS NOT NULL; "
    "INSERT INTO turns_fts(rowid, text) SELECT new.id, new.text WHERE new.text IS NOT NULL; END",
]
SQLITE_FTS_DROP = [
    "DROP TRIGGER IF EXISTS turns_fts_update",
    "DROP TRIGGER IF EXISTS turns_fts_delete",
    "DROP TRIGGER IF EXISTS turns_fts_insert",
    "DROP TABLE IF EXISTS turns_fts",
]
# PostgreSQL: a generated tsvector column with a GIN index. The 'simple'
# configuration (lower-casing, no stemming, no stop words) matches what FTS5's
# unicode61 tokenizer does, so both stores answer a query the same way.
PG_FTS = [
    "ALTER TABLE turns ADD COLUMN text_tsv tsvector "
    "GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, coalesce(text, ''))) STORED",
    "CREATE INDEX ix_turns_text_tsv ON turns USING gin (text_tsv)",
]
PG_FTS_DROP = [
    "DROP INDEX IF EXISTS ix_turns_text_tsv",
    "ALTER TABLE turns DROP COLUMN IF EXISTS text_tsv",
]


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("call_id", sa.String(64), primary_key=True),
        sa.Column("sip_call_id", sa.Text(), nullable=False),
        sa.Column("from_uri", sa.Text(), nullable=False),
        sa.Column("to_uri", sa.Text(), nullable=False),
        sa.Column("from_user", sa.Text(), nullable=False),
        sa.Column("to_user", sa.Text(), nullable=False),
        sa.Column("tags", JSONType, nullable=False),
        sa.Column("dialplan_rule", sa.Text()),
        sa.Column("codec", sa.String(16)),
        sa.Column("transport", sa.String(8)),
        sa.Column("remote_media", sa.Text()),
        sa.Column("local_media_port", sa.Integer()),
        sa.Column("language", sa.String(16)),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("answered_at", TS),
        sa.Column("ended_at", TS),
        sa.Column("end_reason", sa.String(32)),
        sa.Column("duration_ms", sa.Integer()),
        sa.Column("turn_count", sa.Integer(), nullable=False),
        sa.Column("dtmf_count", sa.Integer(), nullable=False),
        sa.Column("rtp_stats", JSONType),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_calls_started_at", "calls", ["started_at"])
    op.create_index("ix_calls_status_started_at", "calls", ["status", "started_at"])

    op.create_table(
        "legs",
        sa.Column("call_id", sa.String(64), sa.ForeignKey("calls.call_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("label", sa.String(64), primary_key=True),
        sa.Column("created_at", TS, nullable=False),
    )

    op.create_table(
        "turns",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("call_id", sa.String(64), sa.ForeignKey("calls.call_id", ondelete="CASCADE"), nullable=False),
        sa.Column("leg", sa.String(64), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("start_ms", sa.Integer(), nullable=False),
        sa.Column("end_ms", sa.Integer(), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("text", sa.Text()),
        sa.Column("partial_count", sa.Integer(), nullable=False),
        sa.Column("partial_text", sa.Text()),
        sa.Column("reason", sa.String(16)),
        sa.Column("language", sa.String(16)),
        sa.Column("avg_logprob", sa.Float()),
        sa.Column("no_speech_prob", sa.Float()),
        sa.Column("compression_ratio", sa.Float()),
        sa.Column("language_probability", sa.Float()),
        sa.Column("asr_model", sa.Text()),
        sa.Column("asr_audio_ms", sa.Float()),
        sa.Column("asr_processing_ms", sa.Float()),
        sa.Column("latency_ms", sa.Float()),
        sa.Column("speculative", sa.Boolean()),
        sa.Column("error", sa.String(32)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finalized_at", TS),
        sa.UniqueConstraint("call_id", "leg", "turn", name="uq_turns_call_leg_turn"),
    )
    op.create_index("ix_turns_call_start", "turns", ["call_id", "start_ms"])

    op.create_table(
        "dtmf",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("call_id", sa.String(64), sa.ForeignKey("calls.call_id", ondelete="CASCADE"), nullable=False),
        sa.Column("leg", sa.String(64), nullable=False),
        sa.Column("digit", sa.String(8), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("offset_ms", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(96), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_dtmf_call_offset", "dtmf", ["call_id", "offset_ms"])

    op.create_table(
        "call_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(96), nullable=False, unique=True),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("call_id", sa.String(64), sa.ForeignKey("calls.call_id", ondelete="CASCADE"), nullable=False),
        sa.Column("stream_id", sa.String(48), nullable=False),
        sa.Column("event_time", TS),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("raw", JSONType, nullable=False),
    )
    op.create_index("ix_call_events_call_id", "call_events", ["call_id"])

    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", TS),
        sa.Column("last_login_at", TS),
        sa.Column("disabled", sa.Boolean(), nullable=False),
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS),
        sa.Column("revoked", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])

    dialect = op.get_bind().dialect.name
    for statement in SQLITE_FTS if dialect == "sqlite" else PG_FTS if dialect == "postgresql" else []:
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for statement in SQLITE_FTS_DROP if dialect == "sqlite" else PG_FTS_DROP if dialect == "postgresql" else []:
        op.execute(statement)
    op.drop_table("api_tokens")
    op.drop_table("users")
    op.drop_table("call_events")
    op.drop_table("dtmf")
    op.drop_table("turns")
    op.drop_table("legs")
    op.drop_table("calls")
