"""Initial tables: events, snapshots, outbox, inbox, positions, schedule claims, saga instances.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from event_store.models import BigId, utcnow

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION conveyor_outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('conveyor_outbox', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
_NOTIFY_TRIGGER = """
CREATE TRIGGER conveyor_outbox_inserted AFTER INSERT ON outbox
FOR EACH STATEMENT EXECUTE FUNCTION conveyor_outbox_notify()
"""


def _now(name: str, nullable: bool = False, default: bool = True) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=nullable,
        server_default=sa.DefaultClause(utcnow()) if default else None,
    )


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("position", BigId, primary_key=True, autoincrement=True),
        sa.Column("stream_id", sa.String(255), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=True),
        _now("recorded_at"),
        sa.PrimaryKeyConstraint("position", name="pk_events"),
        sa.UniqueConstraint("stream_id", "version", name="uq_events_stream_id_version"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_events_type_position", "events", ["type", "position"])
    op.create_table(
        "snapshots",
        sa.Column("stream_id", sa.String(255), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=True),
        _now("recorded_at"),
        sa.PrimaryKeyConstraint("stream_id", "version", name="pk_snapshots"),
    )
    op.create_table(
        "outbox",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("partition_key", sa.String(255), nullable=True),
        sa.Column("headers", sa.JSON, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        _now("created_at"),
        _now("available_at"),
        _now("sent_at", nullable=True, default=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("message_id", name="uq_outbox_message_id"),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_outbox_unsent",
        "outbox",
        ["id"],
        postgresql_where=sa.text("sent_at IS NULL"),
        sqlite_where=sa.text("sent_at IS NULL"),
    )
    op.create_index("ix_outbox_sent_at", "outbox", ["sent_at"])
    op.create_table(
        "inbox",
        sa.Column("handler", sa.String(128), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=False),
        _now("processed_at"),
        sa.PrimaryKeyConstraint("handler", "message_id", name="pk_inbox"),
    )
    op.create_index("ix_inbox_processed_at", "inbox", ["processed_at"])
    op.create_table(
        "positions",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        _now("updated_at"),
        sa.PrimaryKeyConstraint("name", name="pk_positions"),
    )
    op.create_table(
        "schedule_claims",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("schedule", sa.String(128), nullable=False),
        sa.Column("fire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(32), nullable=False, server_default="claimed"),
        sa.Column("claimed_by", sa.String(255), nullable=True),
        _now("claimed_at"),
        _now("started_at", nullable=True, default=False),
        _now("finished_at", nullable=True, default=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_schedule_claims"),
        sa.UniqueConstraint("schedule", "fire_time", name="uq_schedule_claims_schedule_fire_time"),
        sqlite_autoincrement=True,
    )
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
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_NOTIFY_FUNCTION)
        op.execute(_NOTIFY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS conveyor_outbox_inserted ON outbox")
        op.execute("DROP FUNCTION IF EXISTS conveyor_outbox_notify()")
    for table in ("saga_instances", "schedule_claims", "positions", "inbox", "outbox", "snapshots", "events"):
        op.drop_table(table)
