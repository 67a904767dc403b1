"""Who speaks on each leg of a SIPREC call: legs.role, legs.participant, legs.number.

A SIPREC recording (docs/siprec.md) has one leg per party; its turn events carry the
party's role (customer, agent, unknown), name and number from the recording metadata.
The store keeps the latest of them per leg, so that the call's page shows a
two-speaker transcript (who said what) after the call as it did live.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # plain ADD COLUMN on SQLite too (no batch copy of legs)
    op.add_column("legs", sa.Column("role", sa.String(16), nullable=True))
    op.add_column("legs", sa.Column("participant", sa.String(256), nullable=True))
    op.add_column("legs", sa.Column("number", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("legs", "number")
    op.drop_column("legs", "participant")
    op.drop_column("legs", "role")
