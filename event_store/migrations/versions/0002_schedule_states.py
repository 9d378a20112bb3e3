"""Schedule pause state, shared by every scheduler replica.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from event_store.models import utcnow

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedule_states",
        sa.Column("schedule", sa.String(128), nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("resumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.DefaultClause(utcnow())),
        sa.PrimaryKeyConstraint("schedule", name="pk_schedule_states"),
    )


def downgrade() -> None:
    op.drop_table("schedule_states")
