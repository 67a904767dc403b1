"""The dialplan profile a call was routed with: calls.dialplan_profile.

call.started names the rule and, since dialplan profiles (docs/dialplan.md), the
profile that rule selected; the store keeps both so that a supervisor can find
the calls of one profile after the plan has been reloaded with other names.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("calls", sa.Column("dialplan_profile", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("calls", "dialplan_profile")
