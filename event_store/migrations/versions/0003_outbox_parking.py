"""Outbox parking: ``parked_at``, and a partial index of the unsent rows that failed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Written out rather than imported: a migration must not change when the models do.
_RETRYING = "sent_at IS NULL AND (attempts > 0 OR parked_at IS NOT NULL)"


def upgrade() -> None:
    op.add_column("outbox", sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_outbox_retrying",
        "outbox",
        ["partition_key", "id"],
        postgresql_where=sa.text(_RETRYING),
        sqlite_where=sa.text(_RETRYING),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_retrying", table_name="outbox")
    op.drop_column("outbox", "parked_at")
