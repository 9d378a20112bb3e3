"""Schedule run leases: ``owner`` and ``lease_until`` of a started run.

A run is started by one delivery of its job message, which holds a lease on
it (renewed while the job runs); another delivery runs the job only once the
run failed or its lease ran out (the attempt's worker died).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("schedule_claims", sa.Column("owner", sa.String(255), nullable=True))
    op.add_column("schedule_claims", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("schedule_claims", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_column("lease_until")
        batch.drop_column("owner")
