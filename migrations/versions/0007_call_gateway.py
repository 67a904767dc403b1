"""Which gateway instance carried each call: calls.gateway (call.started's ``gateway``).

Several gateway processes share one store (issue 14). When one of them dies
(``kill -9``, a lost box) its calls never get a ``call.ended``; the persister
finds them by this column once the instance's heartbeat has been missing for
``gateway_lost_after_s`` and ends them with reason ``gateway-lost``
(gateway/instances.py). Indexed: that sweep asks for one instance's open calls.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("calls", sa.Column("gateway", sa.String(128), nullable=True))
    op.create_index("ix_calls_gateway", "calls", ["gateway"])


def downgrade() -> None:
    op.drop_index("ix_calls_gateway", table_name="calls")
    op.drop_column("calls", "gateway")
