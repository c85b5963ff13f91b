"""Device keys on assignments (one assignment per device and round) and rate-limit counters.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01

Written by hand and frozen, like 0001: it must not import the models.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, so existing rows (anonymous devices) need no backfill and SQLite can add it
    # with a plain ALTER TABLE.
    op.add_column("assignments", sa.Column("device_key", sa.String(length=64), nullable=True))
    op.create_index(
        "uq_assignments_round_device", "assignments", ["round_pk", "device_key"], unique=True
    )
    op.create_table(
        "rate_limit_counters",
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("window_start", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", "window_start"),
    )


def downgrade() -> None:
    op.drop_table("rate_limit_counters")
    op.drop_index("uq_assignments_round_device", table_name="assignments")
    # SQLite cannot drop a column in place; batch mode copies the table.
    with op.batch_alter_table("assignments") as batch:
        batch.drop_column("device_key")
