"""Held dead letters: dead letters the broker refused for good, kept in the database.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from event_store.models import BigId, utcnow

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

def upgrade() -> None:
    op.create_table(
        "held_dead_letters",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=True),
        sa.Column("partition_key", sa.String(255), nullable=True),
        sa.Column("headers", sa.JSON, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("held_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.DefaultClause(utcnow())),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_held_dead_letters_topic_id", "held_dead_letters", ["topic", "id"])


def downgrade() -> None:
    op.drop_index("ix_held_dead_letters_topic_id", table_name="held_dead_letters")
    op.drop_table("held_dead_letters")
