"""Sagas: instances with a version, and their step logs.

Replaces the ``saga_instances`` table of 0001, which no code ever wrote.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 04:00:00
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from event_store.models import BigId, utcnow

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _now(name: str) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False, server_default=sa.DefaultClause(utcnow()))


def upgrade() -> None:
    op.drop_index("ix_saga_instances_saga_name_state", table_name="saga_instances")
    op.drop_table("saga_instances")
    op.create_table(
        "sagas",
        sa.Column("saga", sa.String(128), nullable=False),
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("waiting", sa.String(32), nullable=True),
        sa.Column("sent", sa.Integer, nullable=False),
        sa.Column("undo_attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("state", sa.JSON, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=True),
        _now("created_at"),
        _now("updated_at"),
        sa.PrimaryKeyConstraint("saga", "id", name="pk_sagas"),
    )
    op.create_index("ix_sagas_status_updated_at", "sagas", ["status", "updated_at"])
    op.create_table(
        "saga_log",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("saga", sa.String(128), nullable=False),
        sa.Column("instance_id", sa.String(200), nullable=False),
        sa.Column("step", sa.String(128), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("token", sa.String(32), nullable=True),
        _now("at"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_saga_log_saga_instance_id_id", "saga_log", ["saga", "instance_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_saga_log_saga_instance_id_id", table_name="saga_log")
    op.drop_table("saga_log")
    op.drop_index("ix_sagas_status_updated_at", table_name="sagas")
    op.drop_table("sagas")
    op.create_table(
        "saga_instances",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("saga_name", sa.String(128), nullable=False),
        sa.Column("state", sa.String(64), nullable=False),
        sa.Column("step", sa.Integer, nullable=False, server_default="0"),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        _now("created_at"),
        _now("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_saga_instances"),
    )
    op.create_index("ix_saga_instances_saga_name_state", "saga_instances", ["saga_name", "state"])
