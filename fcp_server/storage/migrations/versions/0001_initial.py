"""Initial schema: tasks, rounds, assignments, status history, round metrics, device tokens.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written by hand and frozen: it must not import the models, so later model edits need a new
revision (tests compare the migrated schema with the models).
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACTIVE = sa.text("status IN ('CREATED', 'OPEN')")


def _ts(name: str, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _status(name: str = "status") -> sa.Column[Any]:
    return sa.Column(name, sa.String(length=40), nullable=False)


def _sha(name: str) -> sa.Column[Any]:
    return sa.Column(name, sa.String(length=64), nullable=True)


def upgrade() -> None:
    op.create_table(
        "device_tokens",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("token_sha256"),
    )
    op.create_table(
        "status_history",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _status("entity"),
        sa.Column("entity_id", sa.String(length=64), nullable=False),
        sa.Column("from_status", sa.String(length=40), nullable=True),
        sa.Column("to_status", sa.String(length=40), nullable=False),
        _ts("changed_at"),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_status_history_entity", "status_history", ["entity", "entity_id"])
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("population_name", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        _status("kind"),
        _status(),
        sa.Column("total_iteration", sa.Integer(), nullable=False),
        sa.Column("report_goal", sa.Integer(), nullable=False),
        sa.Column("max_aggregation_size", sa.Integer(), nullable=False),
        sa.Column("min_client_version", sa.String(length=32), nullable=False),
        sa.Column("max_client_version", sa.String(length=32), nullable=False),
        sa.Column("traffic_weight", sa.Integer(), nullable=False),
        sa.Column("round_deadline_seconds", sa.Integer(), nullable=False),
        sa.Column("info_json", sa.Text(), nullable=False),
        sa.Column("correlation_id", sa.String(length=128), nullable=False),
        sa.Column("training_task_pk", sa.Integer(), nullable=True),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("stopped_at", nullable=True),
        sa.Column("completed_iterations", sa.Integer(), nullable=False),
        sa.Column("current_iteration", sa.Integer(), nullable=False),
        sa.Column("epsilon_spent", sa.Float(), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=False),
        _sha("client_plan_sha256"),
        _sha("server_plan_sha256"),
        _sha("init_checkpoint_sha256"),
        sa.ForeignKeyConstraint(["training_task_pk"], ["tasks.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("population_name", "task_id", name="uq_tasks_population_task"),
    )
    op.create_index("ix_tasks_status", "tasks", ["status"])
    op.create_index(
        "uq_tasks_one_active_per_kind",
        "tasks",
        ["population_name", "kind"],
        unique=True,
        sqlite_where=_ACTIVE,
        postgresql_where=_ACTIVE,
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_pk", sa.Integer(), nullable=False),
        sa.Column("iteration_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        _status(),
        sa.Column("report_goal", sa.Integer(), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("active_count", sa.Integer(), nullable=False),
        sa.Column("reported_count", sa.Integer(), nullable=False),
        sa.Column("aggregated_count", sa.Integer(), nullable=False),
        sa.Column("base_result_id", sa.Integer(), nullable=False),
        sa.Column("evaluated_result_id", sa.Integer(), nullable=True),
        _sha("client_checkpoint_sha256"),
        _ts("created_at"),
        _ts("deadline_at"),
        _ts("status_changed_at"),
        sa.Column("apply_attempts", sa.Integer(), nullable=False),
        _ts("completed_at", nullable=True),
        sa.Column("status_reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["task_pk"], ["tasks.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("task_pk", "iteration_id", "attempt", name="uq_rounds_task_iteration"),
    )
    op.create_index("ix_rounds_status", "rounds", ["status"])
    op.create_index("ix_rounds_task_pk", "rounds", ["task_pk"])
    op.create_table(
        "assignments",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("round_pk", sa.Integer(), nullable=False),
        _status(),
        sa.Column("client_version", sa.String(length=32), nullable=False),
        _ts("created_at"),
        _ts("status_changed_at"),
        _sha("upload_sha256"),
        sa.Column("upload_bytes", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["round_pk"], ["rounds.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_assignments_round_status", "assignments", ["round_pk", "status"])
    op.create_index("ix_assignments_status_changed", "assignments", ["status", "status_changed_at"])
    op.create_table(
        "round_metrics",
        sa.Column("round_pk", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["round_pk"], ["rounds.id"]),
        sa.PrimaryKeyConstraint("round_pk", "name"),
    )


def downgrade() -> None:
    op.drop_table("round_metrics")
    op.drop_table("assignments")
    op.drop_table("rounds")
    op.drop_table("tasks")
    op.drop_table("status_history")
    op.drop_table("device_tokens")
