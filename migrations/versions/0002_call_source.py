"""Sessions from any source: calls.source_kind and calls.source_ids.

Every stored call so far came over SIP, so existing rows get ``sip``; their ids
(the SIP Call-ID) are already in ``sip_call_id``, so ``source_ids`` stays NULL
for them rather than rewriting every row.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    # plain ADD COLUMN on SQLite too (no batch copy of calls, which other tables reference)
    op.add_column("calls", sa.Column("source_kind", sa.String(16), nullable=False, server_default="sip"))
    op.add_column("calls", sa.Column("source_ids", JSONType))
    op.create_index("ix_calls_source_kind", "calls", ["source_kind"])


def downgrade() -> None:
    op.drop_index("ix_calls_source_kind", table_name="calls")
    op.drop_column("calls", "source_ids")
    op.drop_column("calls", "source_kind")
