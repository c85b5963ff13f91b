"""Read-only queries behind the monitoring dashboard and `tools/plot_operations.py`.

The dashboard shows what an operator of ODP's Federated Compute server watches (its Looker
dashboards and Prometheus timers, odp-federated-compute.md section 3.1): the populations,
each task's status and DP budget spent, the progress of the round being collected
(assigned / reported / report goal) and each task's per-round metrics (the `ModelMetrics`
rows written when a round closes). `operations` adds the fleet view: check-ins per minute by
how each assignment ended, and every round's start and end, for the duration and rate plots.

Everything here only SELECTs, and every result is bounded (tasks, chart points, metric
series, rounds), so a poll costs the same however long the server has been running.
"""

import dataclasses
import datetime as dt
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from fcp_server.storage.models import (
    ACTIVE_ROUND_STATUSES,
    Assignment,
    Round,
    RoundMetric,
    RoundStatus,
    Task,
)

# Newest tasks shown; older ones are still in `fcp-server tasks list`.
MAX_TASKS = 20
# Most recent completed rounds charted per task.
MAX_POINTS = 200
# Metric series charted per task (client metrics first, see `_metric_order`).
MAX_SERIES = 16
# Rounds listed in `operations` (the most recent ones in the window).
MAX_ROUNDS = 2000
# Longest operations window: one week of minute buckets.
MAX_WINDOW = dt.timedelta(days=7)
# Metric row whose latest value is the task's epsilon budget (written by `round_close`).
TARGET_EPSILON_METRIC = "server/dp/target_epsilon"
EPSILON_METRIC = "server/dp/epsilon_spent"


@dataclasses.dataclass(frozen=True)
class RoundProgress:
    """The latest attempt of a task's latest round."""

    iteration_id: int
    attempt: int
    status: str
    # Assignments handed out in this attempt (whatever became of them).
    assigned: int
    # Assignments still holding a slot (ASSIGNED, LOCAL_COMPLETED, UPLOAD_COMPLETED).
    active: int
    # Uploads accepted so far; the round aggregates when this reaches `goal`.
    reported: int
    goal: int
    # Most assignments open at once (goal x (1 + over-selection)).
    capacity: int
    created_at: dt.datetime
    deadline_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class MetricSeries:
    """One metric of a task over its completed rounds."""

    name: str
    # (iteration_id, value), by increasing iteration.
    points: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class TaskView:
    """One task as the dashboard shows it."""

    population: str
    task_id: int
    kind: str
    status: str
    status_reason: str
    total_iterations: int
    completed_iterations: int
    report_goal: int
    # Epsilon spent so far at the plan's delta (0 without DP).
    epsilon_spent: float
    # The plan's epsilon budget, when a closed round reported one.
    target_epsilon: float | None
    created_at: dt.datetime
    current_round: RoundProgress | None
    metrics: tuple[MetricSeries, ...]


@dataclasses.dataclass(frozen=True)
class PopulationView:
    """A population and how many of its tasks are in each status."""

    name: str
    tasks_by_status: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class AssignmentBucket:
    """Assignments created in one minute that ended (so far) in one status."""

    minute: dt.datetime
    result: str
    count: int


@dataclasses.dataclass(frozen=True)
class RoundTiming:
    """When one round attempt started and, if it did, completed."""

    population: str
    task_id: int
    iteration_id: int
    attempt: int
    status: str
    created_at: dt.datetime
    completed_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Operations:
    """Fleet activity in a time window (what `tools/plot_operations.py` draws)."""

    window_start: dt.datetime
    window_end: dt.datetime
    assignments: tuple[AssignmentBucket, ...]
    rounds: tuple[RoundTiming, ...]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything the dashboard page shows at one moment."""

    generated_at: dt.datetime
    populations: tuple[PopulationView, ...]
    tasks: tuple[TaskView, ...]
    operations: Operations


def snapshot(session: Session, *, now: dt.datetime, window: dt.timedelta) -> Snapshot:
    """Reads the dashboard's state.

    Args:
        session: A database session; nothing is written.
        now: The server clock's current time (aware UTC); the operations window ends here.
        window: How far back `operations` looks (at most `MAX_WINDOW`).

    Returns:
        The snapshot.
    """
    return Snapshot(
        generated_at=now,
        populations=populations(session),
        tasks=tasks(session),
        operations=operations(session, since=now - window, until=now),
    )


def populations(session: Session) -> tuple[PopulationView, ...]:
    """Every population with its task counts by status, by name."""
    rows = session.execute(
        select(Task.population_name, Task.status, func.count())
        .group_by(Task.population_name, Task.status)
        .order_by(Task.population_name)
        .limit(50 * MAX_TASKS)
    ).tuples()
    counts: dict[str, dict[str, int]] = {}
    for name, status, n in rows:
        counts.setdefault(name, {})[status.value] = n
    return tuple(PopulationView(name, dict(sorted(c.items()))) for name, c in counts.items())


def tasks(session: Session) -> tuple[TaskView, ...]:
    """The `MAX_TASKS` newest tasks with their latest round and metric series."""
    rows = session.scalars(select(Task).order_by(Task.id.desc()).limit(MAX_TASKS)).all()
    pks = [t.id for t in rows]
    progress = _latest_rounds(session, pks)
    series = _metric_series(session, pks)
    views = []
    for t in rows:
        metrics = series.get(t.id, ())
        target = next((s.points[-1][1] for s in metrics if s.name == TARGET_EPSILON_METRIC), None)
        views.append(
            TaskView(
                population=t.population_name,
                task_id=t.task_id,
                kind=t.kind.value,
                status=t.status.value,
                status_reason=t.status_reason,
                total_iterations=t.total_iteration,
                completed_iterations=t.completed_iterations,
                report_goal=t.report_goal,
                epsilon_spent=t.epsilon_spent,
                target_epsilon=target,
                created_at=t.created_at,
                current_round=progress.get(t.id),
                metrics=_metric_order(metrics)[:MAX_SERIES],
            )
        )
    return tuple(views)


def _latest_rounds(session: Session, task_pks: Sequence[int]) -> dict[int, RoundProgress]:
    latest = (
        select(func.max(Round.id)).where(Round.task_pk.in_(task_pks)).group_by(Round.task_pk)
    ).scalar_subquery()
    assigned = (
        select(func.count()).where(Assignment.round_pk == Round.id).scalar_subquery()
    ).correlate(Round)
    rows = session.execute(select(Round, assigned).where(Round.id.in_(latest))).tuples()
    return {
        rnd.task_pk: RoundProgress(
            iteration_id=rnd.iteration_id,
            attempt=rnd.attempt,
            status=rnd.status.value,
            assigned=n,
            active=rnd.active_count,
            reported=rnd.reported_count,
            goal=rnd.report_goal,
            capacity=rnd.capacity,
            created_at=rnd.created_at,
            deadline_at=rnd.deadline_at,
        )
        for rnd, n in rows
    }


def _metric_series(session: Session, task_pks: Sequence[int]) -> dict[int, list[MetricSeries]]:
    # Only the last MAX_POINTS completed rounds: a completed round's iteration id is unique
    # (a retried attempt never completes twice) and they count up to completed_iterations.
    rows = session.execute(
        select(Round.task_pk, RoundMetric.name, Round.iteration_id, RoundMetric.value)
        .join(RoundMetric, RoundMetric.round_pk == Round.id)
        .join(Task, Task.id == Round.task_pk)
        .where(
            Round.task_pk.in_(task_pks),
            Round.status == RoundStatus.COMPLETED,
            Round.iteration_id > Task.completed_iterations - MAX_POINTS,
        )
        .order_by(Round.task_pk, RoundMetric.name, Round.iteration_id)
    ).tuples()
    grouped: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for task_pk, name, iteration, value in rows:
        grouped.setdefault(task_pk, {}).setdefault(name, []).append((iteration, value))
    return {
        pk: [MetricSeries(name, tuple(points)) for name, points in by_name.items()]
        for pk, by_name in grouped.items()
    }


def _metric_order(series: Iterable[MetricSeries]) -> tuple[MetricSeries, ...]:
    # What the devices measured (loss, accuracy) matters most, then the privacy spent, then
    # the other DP facts and the aggregator's bookkeeping; alphabetical within each group.
    def rank(s: MetricSeries) -> tuple[int, str]:
        if "/client_work/" in s.name:
            return 0, s.name
        if s.name == EPSILON_METRIC:
            return 1, s.name
        if "/dp/" in s.name:
            return 2, s.name
        return 3, s.name

    return tuple(sorted(series, key=rank))


def operations(session: Session, *, since: dt.datetime, until: dt.datetime) -> Operations:
    """Check-ins per minute by result, and the rounds alive at some time in the window.

    Assignments count in the minute they were created (check-in), by the status they are in
    now: the result of that check-in so far. A round is in the window when it was created by
    `until` and is still active or last changed status after `since`.

    Args:
        session: A database session; nothing is written.
        since: Window start (aware UTC).
        until: Window end (aware UTC), after `since` and at most `MAX_WINDOW` later.

    Returns:
        The assignment buckets of check-ins in `(since, until]` (by minute, then result) and
        up to `MAX_ROUNDS` rounds (the most recent, oldest first).

    Raises:
        ValueError: The window is empty, too long or not timezone-aware.
    """
    if since.tzinfo is None or until.tzinfo is None:
        raise ValueError("operations window bounds must be timezone-aware datetimes")
    if not since < until <= since + MAX_WINDOW:
        raise ValueError(f"operations window must be non-empty and at most {MAX_WINDOW}")
    buckets: Counter[tuple[dt.datetime, str]] = Counter()
    # Streamed so memory follows the number of distinct minutes, not of assignments.
    stream = session.execute(
        select(Assignment.created_at, Assignment.status)
        .where(Assignment.created_at > since, Assignment.created_at <= until)
        .execution_options(yield_per=1000)
    ).tuples()
    for created, status in stream:
        buckets[(created.replace(second=0, microsecond=0), status.value)] += 1
    rounds = session.execute(
        select(Round, Task.population_name, Task.task_id)
        .join(Task, Task.id == Round.task_pk)
        .where(
            Round.created_at <= until,
            or_(Round.status.in_(ACTIVE_ROUND_STATUSES), Round.status_changed_at > since),
        )
        .order_by(Round.id.desc())
        .limit(MAX_ROUNDS)
    ).tuples()
    timings = [
        RoundTiming(
            population=pop,
            task_id=task_id,
            iteration_id=rnd.iteration_id,
            attempt=rnd.attempt,
            status=rnd.status.value,
            created_at=rnd.created_at,
            completed_at=rnd.completed_at,
        )
        for rnd, pop, task_id in rounds
    ]
    return Operations(
        window_start=since,
        window_end=until,
        assignments=tuple(AssignmentBucket(m, r, n) for (m, r), n in sorted(buckets.items())),
        rounds=tuple(reversed(timings)),
    )
