"""Database schema: tasks, rounds, assignments, status history, metrics, tokens, rate limits.

All round state lives here so any number of web and worker processes can share it. The tables
follow the ODP Federated Compute Spanner schema (`task_database.sdl`: Task, Iteration,
Assignment, *StatusHistory, ModelMetrics, AllowedAuthorizationToken) with two additions that
fix the reference's races: a round carries `active_count` / `reported_count` counters that
check-in and upload move with conditional UPDATEs, so capacity and the report goal are checked
atomically. Status columns are stored as enum names in VARCHARs (portable between SQLite and
PostgreSQL, and migrations never have to alter a native enum type).
"""

import datetime as dt
import enum
from typing import Annotated

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        """Converts to UTC (naive on SQLite); refuses naive input."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; pass an aware UTC datetime")
        # SQLite keeps no zone: store naive UTC there so text comparison orders correctly.
        utc = value.astimezone(dt.UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        """Reads back an aware UTC datetime."""
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class TaskKind(enum.Enum):
    """What a task's plans do."""

    TRAINING = "TRAINING"
    EVALUATION = "EVALUATION"


class TaskStatus(enum.Enum):
    """Task lifecycle (proto fcp.TaskStatus)."""

    CREATED = "CREATED"
    OPEN = "OPEN"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"
    FAILED = "FAILED"


class RoundStatus(enum.Enum):
    """Round (ODP iteration) lifecycle: COLLECTING -> AGGREGATING -> APPLYING -> COMPLETED."""

    COLLECTING = "COLLECTING"
    AGGREGATING = "AGGREGATING"
    APPLYING = "APPLYING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


class AssignmentStatus(enum.Enum):
    """One device's participation in one round (ODP assignment status codes)."""

    ASSIGNED = "ASSIGNED"
    LOCAL_COMPLETED = "LOCAL_COMPLETED"
    UPLOAD_COMPLETED = "UPLOAD_COMPLETED"
    LOCAL_FAILED = "LOCAL_FAILED"
    LOCAL_NOT_ELIGIBLE = "LOCAL_NOT_ELIGIBLE"
    LOCAL_FAILED_EXAMPLE_GENERATION = "LOCAL_FAILED_EXAMPLE_GENERATION"
    LOCAL_FAILED_MODEL_COMPUTATION = "LOCAL_FAILED_MODEL_COMPUTATION"
    LOCAL_FAILED_OPS_ERROR = "LOCAL_FAILED_OPS_ERROR"
    LOCAL_TIMEOUT = "LOCAL_TIMEOUT"
    UPLOAD_TIMEOUT = "UPLOAD_TIMEOUT"
    CANCELED = "CANCELED"


class EntityKind(enum.Enum):
    """Which table a status-history row belongs to."""

    TASK = "TASK"
    ROUND = "ROUND"
    ASSIGNMENT = "ASSIGNMENT"


# Assignments that still hold a capacity slot of their round (ODP: status <= 99).
ACTIVE_ASSIGNMENT_STATUSES = (
    AssignmentStatus.ASSIGNED,
    AssignmentStatus.LOCAL_COMPLETED,
    AssignmentStatus.UPLOAD_COMPLETED,
)
ACTIVE_TASK_STATUSES = (TaskStatus.CREATED, TaskStatus.OPEN)
ACTIVE_ROUND_STATUSES = (RoundStatus.COLLECTING, RoundStatus.AGGREGATING, RoundStatus.APPLYING)

intpk = Annotated[int, mapped_column(Integer, primary_key=True, autoincrement=True)]
# Largest value of INTEGER, the type of every id column (task, round, row ids): a larger id
# from a request can name nothing, and PostgreSQL refuses to even compare it (out of range).
MAX_ID = 2**31 - 1
timestamp = Annotated[dt.datetime, mapped_column(UtcDateTime())]
sha256_hex = Annotated[str | None, mapped_column(String(64))]


def _enum(cls: type[enum.Enum]) -> Enum:
    # VARCHAR + names: no native enum type to migrate, identical on SQLite and PostgreSQL.
    return Enum(cls, native_enum=False, create_constraint=False, length=40)


class Base(DeclarativeBase):
    """Declarative base holding the schema's metadata (used by Alembic's env.py)."""


class Task(Base):
    """A training or evaluation task of a population (ODP `Task`)."""

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("population_name", "task_id", name="uq_tasks_population_task"),
        # One active (CREATED/OPEN) task per population and kind, enforced by the database
        # itself so two concurrent create-task calls cannot both succeed.
        Index(
            "uq_tasks_one_active_per_kind",
            "population_name",
            "kind",
            unique=True,
            sqlite_where=text("status IN ('CREATED', 'OPEN')"),
            postgresql_where=text("status IN ('CREATED', 'OPEN')"),
        ),
    )

    id: Mapped[intpk]
    population_name: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[int] = mapped_column(Integer)
    kind: Mapped[TaskKind] = mapped_column(_enum(TaskKind))
    status: Mapped[TaskStatus] = mapped_column(_enum(TaskStatus), index=True)
    total_iteration: Mapped[int] = mapped_column(Integer)
    report_goal: Mapped[int] = mapped_column(Integer)
    max_aggregation_size: Mapped[int] = mapped_column(Integer)
    min_client_version: Mapped[str] = mapped_column(String(32))
    max_client_version: Mapped[str] = mapped_column(String(32))
    traffic_weight: Mapped[int] = mapped_column(Integer)
    # Seconds a round may collect before it is retried (from the plan; 0 until opened).
    round_deadline_seconds: Mapped[int] = mapped_column(Integer, default=0)
    # proto3 JSON of fcp.TaskInfo, as ODP's Info column.
    info_json: Mapped[str] = mapped_column(Text)
    correlation_id: Mapped[str] = mapped_column(String(128), default="")
    # Eval tasks: the training task whose checkpoints they evaluate.
    training_task_pk: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"))
    created_at: Mapped[timestamp]
    started_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    stopped_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    completed_iterations: Mapped[int] = mapped_column(Integer, default=0)
    current_iteration: Mapped[int] = mapped_column(Integer, default=0)
    epsilon_spent: Mapped[float] = mapped_column(Float, default=0.0)
    status_reason: Mapped[str] = mapped_column(Text, default="")
    # SHA-256 of each uploaded artifact; NULL until the builder PUTs it.
    client_plan_sha256: Mapped[sha256_hex]
    server_plan_sha256: Mapped[sha256_hex]
    init_checkpoint_sha256: Mapped[sha256_hex]


class Round(Base):
    """One attempt of one round of a task (ODP `Iteration`; attempt > 0 retries a deadline)."""

    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("task_pk", "iteration_id", "attempt", name="uq_rounds_task_iteration"),
    )

    id: Mapped[intpk]
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    iteration_id: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[RoundStatus] = mapped_column(_enum(RoundStatus), index=True)
    report_goal: Mapped[int] = mapped_column(Integer)
    # report_goal x (1 + over-selection): how many devices may hold an assignment at once.
    capacity: Mapped[int] = mapped_column(Integer)
    # Assignments holding a slot (ASSIGNED, LOCAL_COMPLETED, UPLOAD_COMPLETED).
    active_count: Mapped[int] = mapped_column(Integer, default=0)
    # Uploads accepted; never exceeds report_goal.
    reported_count: Mapped[int] = mapped_column(Integer, default=0)
    aggregated_count: Mapped[int] = mapped_column(Integer, default=0)
    # Result id of the checkpoint devices start from (training: iteration - 1).
    base_result_id: Mapped[int] = mapped_column(Integer)
    # Eval rounds: the training result they evaluate.
    evaluated_result_id: Mapped[int | None] = mapped_column(Integer)
    client_checkpoint_sha256: Mapped[sha256_hex]
    created_at: Mapped[timestamp]
    deadline_at: Mapped[timestamp]
    status_changed_at: Mapped[timestamp]
    apply_attempts: Mapped[int] = mapped_column(Integer, default=0)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    status_reason: Mapped[str] = mapped_column(Text, default="")


class Assignment(Base):
    """A device's ticket for one round (ODP `Assignment`, keyed by a random session id)."""

    __tablename__ = "assignments"
    __table_args__ = (
        Index("ix_assignments_round_status", "round_pk", "status"),
        Index("ix_assignments_status_changed", "status", "status_changed_at"),
        # One assignment per device and round: a device cannot contribute twice to a round.
        # NULL keys (no device auth, devices are anonymous) are distinct on both backends.
        Index("uq_assignments_round_device", "round_pk", "device_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    round_pk: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    status: Mapped[AssignmentStatus] = mapped_column(_enum(AssignmentStatus))
    client_version: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[timestamp]
    status_changed_at: Mapped[timestamp]
    upload_sha256: Mapped[sha256_hex]
    upload_bytes: Mapped[int | None] = mapped_column(Integer)
    # SHA-256 of the device token that checked in (as DeviceToken.token_sha256); NULL when
    # device auth is off. Only this device may report or upload for the assignment.
    device_key: Mapped[sha256_hex]


class StatusChange(Base):
    """Every status transition of a task, round or assignment (ODP *StatusHistory tables)."""

    __tablename__ = "status_history"
    __table_args__ = (Index("ix_status_history_entity", "entity", "entity_id"),)

    id: Mapped[intpk]
    entity: Mapped[EntityKind] = mapped_column(_enum(EntityKind))
    entity_id: Mapped[str] = mapped_column(String(64))
    from_status: Mapped[str | None] = mapped_column(String(40))
    to_status: Mapped[str] = mapped_column(String(40))
    changed_at: Mapped[timestamp]
    reason: Mapped[str] = mapped_column(Text, default="")


class RoundMetric(Base):
    """One named metric of a completed round (ODP `ModelMetrics`)."""

    __tablename__ = "round_metrics"

    round_pk: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[float] = mapped_column(Float)


class DeviceToken(Base):
    """An issued device bearer token, stored only as its SHA-256 (ODP AllowedAuthorizationToken)."""

    __tablename__ = "device_tokens"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[timestamp]
    expires_at: Mapped[timestamp]
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())


class RateLimitCounter(Base):
    """Requests of one caller in one fixed window, shared by every web worker."""

    __tablename__ = "rate_limit_counters"

    # "device:<token sha256>" or "addr:<client address>".
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    # Start of the window, seconds since the epoch (a multiple of the window length).
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    count: Mapped[int] = mapped_column(Integer)
