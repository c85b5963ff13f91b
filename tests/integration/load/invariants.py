"""The load test's invariants, read from the server's database and blob store.

* capacity: while a round collects, the assignments holding a slot (ASSIGNED, LOCAL_COMPLETED,
  UPLOAD_COMPLETED) never exceed its capacity (report_goal x (1 + over-selection)) and always
  equal its `active_count` counter. A sampler thread checks this in one SQL statement (one
  PostgreSQL snapshot) many times a second during the run;
* exactly report_goal: every completed round has report_goal UPLOAD_COMPLETED assignments,
  `reported_count` = `aggregated_count` = report_goal, one gradient blob per accepted upload
  and none for refused ones, and its published checkpoint is the previous one minus the mean
  of exactly those uploaded deltas (SGD, learning rate 1, no DP);
* every round completes: iterations 1..N each have one COMPLETED round and the task is
  COMPLETED.
"""

import collections
import dataclasses
import datetime as dt
import json
import threading

import numpy as np
from sqlalchemy import func, select, text

from fcp_server import checkpoints
from fcp_server.protos import plan_pb2
from fcp_server.services import blob_paths
from fcp_server.storage import db as fcp_db
from fcp_server.storage.blobs import BlobStore
from fcp_server.storage.models import Assignment, AssignmentStatus, Round, RoundStatus, Task

_HELD = "('ASSIGNED', 'LOCAL_COMPLETED', 'UPLOAD_COMPLETED')"
_SAMPLE = text(
    "SELECT r.id, r.capacity, r.active_count, "
    f"(SELECT count(*) FROM assignments a WHERE a.round_pk = r.id AND a.status IN {_HELD}) "
    "FROM rounds r WHERE r.status = 'COLLECTING'"
)


class CapacitySampler:
    """Samples every collecting round's slot holders until stopped (a background thread)."""

    def __init__(self, database_url: str, interval: float = 0.05) -> None:
        self._database = fcp_db.connect(database_url)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capacity-sampler", daemon=True)
        self.samples = 0
        self.peak_held: dict[int, int] = collections.defaultdict(int)
        self.violations: list[str] = []
        self.error: BaseException | None = None

    def __enter__(self) -> "CapacitySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._database.dispose()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._interval):
                self.sample_once()
        except BaseException as e:  # surfaced by the test after the run
            self.error = e

    def sample_once(self) -> None:
        with self._database.engine.connect() as conn:
            rows = conn.execute(_SAMPLE).all()
        self.samples += 1
        for round_pk, capacity, active_count, held in rows:
            self.peak_held[round_pk] = max(self.peak_held[round_pk], held)
            if held > capacity or held != active_count:
                self.violations.append(
                    f"round {round_pk}: {held} assignments hold slots, "
                    f"active_count {active_count}, capacity {capacity}"
                )


@dataclasses.dataclass(frozen=True)
class RoundFacts:
    """One round (attempt) as the database has it."""

    pk: int
    iteration: int
    attempt: int
    status: RoundStatus
    report_goal: int
    capacity: int
    reported: int
    aggregated: int
    created_at: dt.datetime
    completed_at: dt.datetime | None
    # assignment status -> count
    assignments: dict[AssignmentStatus, int]

    @property
    def assigned(self) -> int:
        return sum(self.assignments.values())

    def count(self, *statuses: AssignmentStatus) -> int:
        return sum(self.assignments.get(s, 0) for s in statuses)


def task_rows(database_url: str) -> list[Task]:
    database = fcp_db.connect(database_url)
    try:
        with database.sessions() as session:
            return list(session.scalars(select(Task).order_by(Task.id)))
    finally:
        database.dispose()


def round_facts(database_url: str, task_pk: int) -> list[RoundFacts]:
    """Every round of the task, oldest first, with its assignments counted by status."""
    database = fcp_db.connect(database_url)
    try:
        with database.sessions() as session:
            rounds = session.scalars(
                select(Round).where(Round.task_pk == task_pk).order_by(Round.id)
            ).all()
            counts: dict[int, dict[AssignmentStatus, int]] = collections.defaultdict(dict)
            for round_pk, status, n in session.execute(
                select(Assignment.round_pk, Assignment.status, func.count())
                .join(Round, Assignment.round_pk == Round.id)
                .where(Round.task_pk == task_pk)
                .group_by(Assignment.round_pk, Assignment.status)
            ).tuples():
                counts[round_pk][status] = n
    finally:
        database.dispose()
    return [
        RoundFacts(
            pk=r.id,
            iteration=r.iteration_id,
            attempt=r.attempt,
            status=r.status,
            report_goal=r.report_goal,
            capacity=r.capacity,
            reported=r.reported_count,
            aggregated=r.aggregated_count,
            created_at=r.created_at,
            completed_at=r.completed_at,
            assignments=counts[r.id],
        )
        for r in rounds
    ]


def uploaded_ids(database_url: str, round_pks: list[int]) -> dict[int, set[str]]:
    """round pk -> ids of its UPLOAD_COMPLETED assignments."""
    database = fcp_db.connect(database_url)
    try:
        with database.sessions() as session:
            rows = session.execute(
                select(Assignment.round_pk, Assignment.id).where(
                    Assignment.round_pk.in_(round_pks),
                    Assignment.status == AssignmentStatus.UPLOAD_COMPLETED,
                )
            ).tuples()
            out: dict[int, set[str]] = collections.defaultdict(set)
            for round_pk, assignment_id in rows:
                out[round_pk].add(assignment_id)
            return out
    finally:
        database.dispose()


def gradient_blob_ids(blobs: BlobStore, pop: str, task_id: int, iteration: int) -> set[str]:
    """Assignment ids that have a gradient blob in the iteration's directory."""
    prefix = f"{pop}/{task_id}/{iteration}/d/"
    return {
        name[len(prefix) :].split("/")[0]
        for name in blobs.list(prefix)
        if name.endswith("/gradient")
    }


def check_aggregation(
    blobs: BlobStore,
    plan: plan_pb2.ServerPlan,
    pop: str,
    task_id: int,
    iteration: int,
    ids: set[str],
) -> list[str]:
    """Problems with round `iteration`'s outputs given the updates it should have averaged."""
    limit = 64 * 1024 * 1024
    if iteration == 1:
        before = checkpoints.initial_server_state(
            plan, blobs.get(blob_paths.artifact_blob(pop, task_id, "checkpoint")), max_bytes=limit
        ).weights.trainable
    else:
        before = checkpoints.decode_server_checkpoint(
            blobs.get(blob_paths.server_checkpoint_blob(pop, task_id, iteration - 1)), plan
        ).weights.trainable
    after = checkpoints.decode_server_checkpoint(
        blobs.get(blob_paths.server_checkpoint_blob(pop, task_id, iteration)), plan
    ).weights.trainable
    updates = [
        checkpoints.decode_update(
            blobs.get(blob_paths.gradient_blob(pop, task_id, iteration, i)), plan, max_bytes=limit
        )
        for i in sorted(ids)
    ]
    problems = []
    for k, (w0, w1) in enumerate(zip(before, after, strict=True)):
        mean = np.mean([np.asarray(u.trainable[k], dtype=np.float64) for u in updates], axis=0)
        if not np.allclose(w1, w0 - mean, rtol=1e-5, atol=1e-6):
            problems.append(
                f"round {iteration}: tensor {k} is not the previous weights minus the mean of "
                f"its {len(updates)} uploaded updates"
            )
    metrics = json.loads(blobs.get(blob_paths.metrics_blob(pop, task_id, iteration)))
    if metrics.get("server/aggregator/num_clients") != float(len(ids)):
        problems.append(
            f"round {iteration}: metrics say {metrics.get('server/aggregator/num_clients')} "
            f"clients, {len(ids)} uploaded"
        )
    return problems
