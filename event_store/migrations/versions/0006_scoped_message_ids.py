"""Message ids scoped by tenant (``tenant/id``, up to 193 characters): wider id columns.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# (table, nullable, SQLite AUTOINCREMENT): SQLite rebuilds the table, which must keep AUTOINCREMENT.
_COLUMNS = (("outbox", False, True), ("inbox", False, False), ("held_dead_letters", True, True))


def _resize(length: int) -> None:
    for table, nullable, autoincrement in _COLUMNS:
        options = {"sqlite_autoincrement": True} if autoincrement else {}
        with op.batch_alter_table(table, table_kwargs=options) as batch:
            batch.alter_column(
                "message_id",
                existing_type=sa.String(200 if length == 128 else 128),
                type_=sa.String(length),
                existing_nullable=nullable,
            )


def upgrade() -> None:
    _resize(200)


def downgrade() -> None:
    _resize(128)
