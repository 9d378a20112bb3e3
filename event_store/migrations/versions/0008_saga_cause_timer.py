"""Sagas: ``cause`` (why an instance compensates), ``timer_id`` (its pending timer), an index for the gauge.

``cause`` keeps the reason an instance started compensating while ``error``
says what is wrong now (an undo that keeps failing), so an instance that ends
``compensated`` after an operator's retry shows why it compensated.
``timer_id`` is the outbox message id of the timer the instance waits on; the
transition that moves the instance on deletes that row if it is still unsent,
so an answered step's timeout is never published. ``ix_sagas_saga_status``
serves the ``conveyor_sagas{saga,status}`` counts.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sagas", sa.Column("cause", sa.Text, nullable=True))
    op.add_column("sagas", sa.Column("timer_id", sa.String(200), nullable=True))
    op.create_index("ix_sagas_saga_status", "sagas", ["saga", "status"])


def downgrade() -> None:
    op.drop_index("ix_sagas_saga_status", table_name="sagas")
    with op.batch_alter_table("sagas") as batch:
        batch.drop_column("timer_id")
        batch.drop_column("cause")
