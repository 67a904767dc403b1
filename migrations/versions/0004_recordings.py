"""Call recordings: calls.recording, recording_duration_ms, recording_bytes, recording_error.

What call.ended says about the call's WAV (docs/recordings.md): its path relative to
``recordings_dir`` (what the dashboard streams), its length and size, or why there is
none. Calls stored before have no recording: the columns stay NULL.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # plain ADD COLUMN on SQLite too (no batch copy of calls, which other tables reference)
    op.add_column("calls", sa.Column("recording", sa.Text))
    op.add_column("calls", sa.Column("recording_duration_ms", sa.Integer))
    op.add_column("calls", sa.Column("recording_bytes", sa.BigInteger))
    op.add_column("calls", sa.Column("recording_error", sa.String(32)))


def downgrade() -> None:
    op.drop_column("calls", "recording_error")
    op.drop_column("calls", "recording_bytes")
    op.drop_column("calls", "recording_duration_ms")
    op.drop_column("calls", "recording")
