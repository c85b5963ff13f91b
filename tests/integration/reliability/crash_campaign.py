"""A crash campaign: SIGKILL the real web server and worker at many points while rounds run.

gunicorn and `fcp-server worker` serve a DP training task (FIXED_GAUSSIAN) on one database and
one local blob directory while `http_devices.Fleet` contributes over HTTP. Kill points are
of two kinds:

* armed: a start of the web server or worker arms one fault point (`fcp_server.fault_points`)
  with a pass count; when it fires, the process kills itself inside that narrow window
  (check-in commit, upload blob write, every stage of the round close, a blob's half-written
  temp file, a transaction's COMMIT);
* random: at random moments the campaign SIGKILLs the web server's or the worker's process
  group, wherever it is.

After each kill the campaign SIGKILLs the rest of that process group (a web kill takes the
whole server down), snapshots the outputs of every round in aggregation (to prove later that
a re-run published the same bytes) and restarts it with the next armed point. When the kill
points are spent the last task runs to completion; if a task completes earlier a new one is
opened. `crash_checks.verify` then checks the outcome.
"""

import contextlib
import dataclasses
import random
import time
from pathlib import Path

from sqlalchemy import select

from fcp_server.app import create_app
from fcp_server.protos import plan_pb2, task_builder_pb2
from fcp_server.services import blob_paths
from fcp_server.settings import ServerSettings
from fcp_server.storage import db as fcp_db
from fcp_server.storage.blobs import BlobNotFound
from fcp_server.storage.blobs_local import LocalBlobStore
from fcp_server.storage.models import Round, RoundStatus, Task, TaskStatus
from tests.integration.reliability import http_devices
from tests.integration.reliability.server_processes import WEB, WORKER, ServerProcesses
from tests.integration.server import testkit

# (point, highest pass count): counts are drawn in [1, highest] per scenario.
WEB_POINTS = (
    ("checkin.before_commit", 3),
    ("checkin.after_commit", 3),
    ("report.after_commit", 3),
    ("upload.after_blob_write", 3),
    ("upload.after_commit", 3),
    ("blob.partial_write", 3),
    ("db.commit", 20),
)
WORKER_POINTS = (
    ("close.after_claim", 2),
    ("close.after_compute", 2),
    ("close.after_stage", 2),
    ("close.after_server_checkpoint", 2),
    ("close.after_client_checkpoint", 2),
    ("close.after_metrics", 2),
    ("close.after_commit", 2),
    ("blob.partial_write", 8),  # a close writes 4 blobs: staged, 2 checkpoints, metrics
    ("db.commit", 60),  # an idle tick commits 5 times, a close 2 or 3 times
)
OUTPUT_BLOBS = (
    blob_paths.server_checkpoint_blob,
    blob_paths.client_checkpoint_blob,
    blob_paths.metrics_blob,
    blob_paths.staged_outputs_blob,
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Shape of a campaign."""

    # Each armed point is used this many times in the web server and in the worker.
    repeats: int = 3
    # SIGKILLs at random moments (alternating web server and worker).
    random_kills: int = 10
    rounds_per_task: int = 25
    report_goal: int = 3
    devices: int = 4
    seed: int = 0
    deadline_s: float = 1500.0

    @property
    def planned_kills(self) -> int:
        return self.repeats * (len(WEB_POINTS) + len(WORKER_POINTS)) + self.random_kills


def dp_plan(config: Config) -> plan_pb2.ServerPlan:
    """FIXED_GAUSSIAN, z = 1 and clip 1: noise std 1/report_goal per element."""
    return testkit.server_plan(
        report_goal=config.report_goal,
        dp_type=task_builder_pb2.DpAggregator.FIXED_GAUSSIAN,
        noise_multiplier=1.0,
        clip_norm=1.0,
        num_rounds=config.rounds_per_task,
    )


@dataclasses.dataclass(frozen=True)
class Kill:
    """One SIGKILL: which process, where ("random" for a timed kill), during which task."""

    kind: str
    point: str
    task_id: int
    completed_rounds: int


@dataclasses.dataclass
class Result:
    """What the campaign did and saw."""

    kills: list[Kill]
    ledger: http_devices.Ledger
    # Blob name -> the contents seen right after each kill, while its round was in flight.
    snapshots: dict[str, list[bytes]]
    task_ids: list[int]
    elapsed_s: float


def _scenarios(
    points: tuple[tuple[str, int], ...], config: Config, rng: random.Random
) -> list[str]:
    specs = [f"{name}:{rng.randint(1, top)}" for name, top in points for _ in range(config.repeats)]
    rng.shuffle(specs)
    return specs


class Campaign:
    """Runs the kill schedule against real processes; see the module docstring."""

    def __init__(self, db_url: str, run_dir: Path, config: Config) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._db_url = db_url
        blob_dir = run_dir / "blobs"
        blob_dir.mkdir(parents=True, exist_ok=True)
        self.blob_url = blob_dir.as_uri()
        self.blobs = LocalBlobStore(blob_dir)
        self._database = fcp_db.connect(db_url)
        self._queues = {
            WEB: _scenarios(WEB_POINTS, config, self._rng),
            WORKER: _scenarios(WORKER_POINTS, config, self._rng),
        }
        self._random_left = config.random_kills
        # The spec each process was started with and that has not fired yet.
        self._armed = {WEB: "", WORKER: ""}
        self._procs = ServerProcesses(
            {
                "FCP_DATABASE_URL": db_url,
                "FCP_BLOB_URL": self.blob_url,
                "FCP_LOG_FORMAT": "text",
                "FCP_WORKER_INTERVAL_SECONDS": "0.2",
                # The dead worker's claim is recovered quickly (one worker: no live takeover).
                "FCP_APPLY_LEASE_SECONDS": "2",
                # Slots leaked by a kill after a check-in commit come back quickly.
                "FCP_LOCAL_COMPUTE_TIMEOUT_SECONDS": "10",
                "FCP_UPLOAD_TIMEOUT_SECONDS": "10",
                # The schedule may kill one round's close several times in a row; a crashed
                # attempt counts towards this bound on purpose (a poison round must not loop
                # forever), so the campaign raises it above what one round can meet here.
                "FCP_MAX_APPLY_ATTEMPTS": "12",
                "FCP_WEB_WORKERS": "2",
                "FCP_WEB_THREADS": "2",
            },
            run_dir,
        )
        self._kills: list[Kill] = []
        self._started = time.monotonic()
        self._snapshots: dict[str, list[bytes]] = {}
        self._task_ids: list[int] = []

    def _start(self, kind: str, *, fired: bool) -> None:
        # A fired point is spent; after a random kill the unfired one is armed again.
        if fired or not self._armed[kind]:
            queue = self._queues[kind]
            self._armed[kind] = queue.pop() if queue else ""
        self._procs.start(kind, self._armed[kind])

    def _open_task(self) -> None:
        settings = ServerSettings(
            database_url=self._db_url,
            blob_url=self.blob_url,
            embedded_worker=False,
            auto_migrate=False,
            log_format="text",
        )
        app = create_app(settings, blobs=self.blobs)
        try:
            api = testkit.Api(app.test_client())
            task = api.open_training(
                testkit.training_task(
                    report_goal=self.config.report_goal,
                    rounds=self.config.rounds_per_task,
                    max_size=self.config.report_goal + 2,
                ),
                plan=dp_plan(self.config),
            )
        finally:
            app.extensions["fcp"].database.dispose()
        self._task_ids.append(int(task.task_id))

    def _current_task(self) -> Task:
        with self._database.sessions() as session:
            task = session.scalar(select(Task).where(Task.task_id == self._task_ids[-1]))
            assert task is not None
            return task

    def _snapshot_in_flight(self) -> None:
        with self._database.sessions() as session:
            rows = session.execute(
                select(Task.population_name, Task.task_id, Round.iteration_id)
                .join(Round, Round.task_pk == Task.id)
                .where(Round.status.in_((RoundStatus.AGGREGATING, RoundStatus.APPLYING)))
            ).all()
        for pop, task_id, iteration in rows:
            for blob in OUTPUT_BLOBS:
                name = blob(pop, task_id, iteration)
                with contextlib.suppress(BlobNotFound):
                    self._snapshots.setdefault(name, []).append(self.blobs.get(name))

    def _restart(self, kind: str, point: str) -> None:
        self._procs.kill(kind)
        self._snapshot_in_flight()
        task = self._current_task()
        self._kills.append(Kill(kind, point, task.task_id, task.completed_iterations))
        print(  # progress, shown with -s or when the test fails
            f"kill {len(self._kills)}: {kind} at {point}, task {task.task_id} after "
            f"{task.completed_iterations} rounds, {time.monotonic() - self._started:.0f} s",
            flush=True,
        )
        self._start(kind, fired=point != "random")

    def _react(self, deadline: float, next_random: float) -> float:
        for kind in (WEB, WORKER):
            point = self._procs.fired(kind)
            if point is not None:
                self._restart(kind, point)
            elif self._procs.exited(kind):
                raise AssertionError(f"the {kind} process exited without being killed")
        if self._random_left and time.monotonic() >= next_random:
            self._random_left -= 1
            self._restart(WEB if self._random_left % 2 else WORKER, "random")
            return time.monotonic() + self._rng.uniform(1.0, 6.0)
        if time.monotonic() > deadline:
            pending = {k: len(q) for k, q in self._queues.items()}
            raise AssertionError(
                f"campaign deadline passed after {len(self._kills)} kills; pending {pending}, "
                f"{self._random_left} random kills left"
            )
        return next_random

    def _spent(self) -> bool:
        armed = self._armed[WEB] or self._armed[WORKER]
        return not (armed or self._queues[WEB] or self._queues[WORKER] or self._random_left)

    def run(self) -> Result:
        started = self._started = time.monotonic()
        deadline = started + self.config.deadline_s
        ledger = http_devices.Ledger()
        self._open_task()
        fleet = http_devices.Fleet(self._procs.base_url, self.config.devices, ledger)
        try:
            self._start(WEB, fired=True)
            self._start(WORKER, fired=True)
            fleet.start()
            next_random = time.monotonic() + self._rng.uniform(1.0, 6.0)
            while True:
                next_random = self._react(deadline, next_random)
                if self._current_task().status != TaskStatus.OPEN:
                    if self._spent():
                        break
                    self._open_task()
                # Every poll is a transaction (on SQLite a write lock): not too often.
                time.sleep(0.25)
            fleet.stop()
        finally:
            fleet.abort()
            self._procs.stop_all()
            self._database.dispose()
        return Result(
            kills=self._kills,
            ledger=ledger,
            snapshots=self._snapshots,
            task_ids=self._task_ids,
            elapsed_s=time.monotonic() - started,
        )
