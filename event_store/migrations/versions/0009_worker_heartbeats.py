"""Worker heartbeats: one row per live process (host, pid, roles, handlers, in flight, last beat).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from event_store.models import utcnow

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_heartbeats",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("service", sa.String(128), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("roles", sa.JSON, nullable=False),
        sa.Column("handlers", sa.JSON, nullable=False),
        sa.Column("in_flight", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False, server_default=utcnow()),
        sa.PrimaryKeyConstraint("id", name="pk_worker_heartbeats"),
    )


def downgrade() -> None:
    op.drop_table("worker_heartbeats")
