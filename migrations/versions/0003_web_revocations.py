"""Dashboard logouts that outlive a restart: web_revocations.

A session cookie is signed and carries its own expiry, so a logout has to be
remembered until that expiry for the cookie to stay refused. Kept in memory
only, a restart (or a second gateway behind the same load balancer) forgot it;
this table is what every process checks.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "web_revocations",
        sa.Column("sid", sa.String(64), primary_key=True),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=False),
    )
    op.create_index("ix_web_revocations_expires_at", "web_revocations", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_web_revocations_expires_at", table_name="web_revocations")
    op.drop_table("web_revocations")
