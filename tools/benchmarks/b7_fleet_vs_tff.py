"""B7: client updates/s of the simulated fleet over HTTP with TFLite plans against TFF.

Same model and data on both sides: the task builder's digits CNN (the EMNIST files are not
available offline, so scikit-learn's bundled digits are the data), the same TaskConfig
(FIXED_GAUSSIAN DP, report goal K, R rounds, one epoch, batch size 10) and the same devices
(`client_sim` data split, seed 0, iid, no held-out devices).

* Fleet: gunicorn (2 workers, SQLite, local blobs) and `fcp-server worker` (checking for rounds
  to close every 20 ms) serve the plans the builder made; `client-sim` runs in the runner
  process with 8 session threads, 2 spawned TFLite processes and no failure knobs (no
  dropouts, no simulated compute time). Every device checks in, downloads the plan and the
  checkpoint, trains the TFLite plan on its own examples, reports and uploads over HTTP;
  the server over-selects 1.5 K devices a round and aggregates the first K uploads. Time:
  from the first device wake-up until the server completed the R-th round (the task's
  COMPLETED time in its status history), after the TFLite processes loaded TensorFlow
  (untimed, as TFF's compiling round). It includes the server's round close, which also runs
  the DP accountant (epsilon spent) after every round. The runner itself sees the end only at
  its next task listing (every 0.1 s); that later time is printed in the notes.
* TFF: the learning process the builder composes from the same config
  (`task_builder.learning_process.compose`), run for R rounds on K devices drawn per round
  from the same device data, after one untimed compiling round. No privacy accounting. It is
  timed once before the fleet and once after (the next R rounds), and the faster time counts,
  so a slow moment of the machine cannot flatter the fleet (the fleet runs once).

Rejected devices come back after a delay drawn from the server's retry window (60-300
simulated seconds for a full or closing round) times the time scale 0.004 (0.24-1.2 s). At
0.001, 40 devices sent about 170 rejected check-ins per second, which took the CPU the round
close needed: one sweep under load gave 54-57 s for the 5 rounds at 0.001, 40 s at 0.002,
32-35 s at 0.004 and 35 s at 0.01 (slower returns once a round opens).
"""

import contextlib
import io
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
from google.protobuf import text_format
from sqlalchemy import select

from fcp_server.protos import task_builder_pb2, task_pb2
from fcp_server.storage import db
from fcp_server.storage.models import EntityKind, StatusChange, TaskStatus
from tools.benchmarks import servers
from tools.benchmarks.figures import Figure

POP = "bench_fleet"
CONFIG = servers.ROOT / "configs" / "digits_cnn_task.pbtxt"
NOISE_MULTIPLIER = 0.5
# Real seconds per simulated second of the devices' retry windows (see the module docstring).
TIME_SCALE = 0.004
# The worker's full tick (timeouts, deadlines) and its check for rounds to close, seconds.
WORKER_INTERVAL_S, WORKER_CLOSE_POLL_S = 1.0, 0.02
PHASES = ("check_in", "download", "train", "report", "upload")


def _config(report_goal: int, rounds: int) -> task_builder_pb2.TaskConfig:
    config = text_format.Parse(CONFIG.read_text(), task_builder_pb2.TaskConfig())
    config.mode = task_builder_pb2.TaskMode.TRAINING_ONLY
    config.federated_learning.ClearField("evaluation")
    config.population_name = POP
    lp = config.federated_learning.learning_process
    lp.runtime_config.report_goal = report_goal
    lp.runtime_config.over_selection_rate = 0.5
    config.policies.model_release_policy.num_max_training_rounds = rounds
    config.policies.model_release_policy.dp_target_epsilon = 0.0
    config.differential_privacy.noise_multiplier = NOISE_MULTIPLIER
    return config


def _task(config: task_builder_pb2.TaskConfig, min_version: str) -> task_pb2.Task:
    goal = config.federated_learning.learning_process.runtime_config.report_goal
    task = task_pb2.Task(
        total_iteration=config.policies.model_release_policy.num_max_training_rounds,
        min_aggregation_size=goal,
        max_aggregation_size=int(goal * 1.5),
        min_client_version=min_version or "0",
    )
    task.info.traffic_weight = 100
    policies = task.info.training_info.eligibility_task_info.eligibility_policies
    policies.add(min_sep_policy=config.policies.min_separation_policy)
    policies.add(data_availability_policy=config.policies.data_availability_policy)
    return task


def _fleet_summary(url: str, devices: int, rounds: int) -> dict[str, Any]:
    """Runs `client-sim` until the task completed `rounds` rounds; returns its summary."""
    from client_sim import cli

    args = ["--server", url, "--population", POP, "--devices", str(devices)]
    args += ["--rounds", str(rounds), "--seed", "0", "--compute-workers", "2"]
    args += ["--concurrency", "8", "--eval-device-fraction", "0", "--quiet"]
    args += ["--dropout", "0", "--crash-after-report", "0", "--network-errors", "0"]
    args += ["--duplicate-uploads", "0", "--stragglers", "0", "--compute-median", "0"]
    args += ["--checkin-interval", "0", "--poll-interval", "0.1", "--max-duration", "1800"]
    args += ["--time-scale", str(TIME_SCALE)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(args)
    summary: dict[str, Any] = json.loads(out.getvalue())
    if code != 0:
        raise RuntimeError(f"client-sim did not reach the goal: {summary}")
    return summary


def task_completed_unix_seconds(database_url: str) -> float:
    """When the server moved the (only) task to COMPLETED, in seconds since the epoch."""
    database = db.connect(database_url)
    try:
        with database.sessions() as session:
            completed = session.scalars(
                select(StatusChange.changed_at).where(
                    StatusChange.entity == EntityKind.TASK,
                    StatusChange.to_status == TaskStatus.COMPLETED.value,
                )
            ).all()
    finally:
        database.engine.dispose()
    if len(completed) != 1:
        raise RuntimeError(f"expected one completed task, found {len(completed)}")
    return completed[0].timestamp()


def round_phase_seconds(database_url: str) -> dict[str, float]:
    """Seconds the rounds spent waiting for the worker (AGGREGATING) and closing (APPLYING)."""
    database = db.connect(database_url)
    try:
        with database.sessions() as session:
            rows = session.execute(
                select(StatusChange.entity_id, StatusChange.to_status, StatusChange.changed_at)
                .where(StatusChange.entity == EntityKind.ROUND)
                .order_by(StatusChange.id)
            ).all()
    finally:
        database.engine.dispose()
    entered: dict[tuple[str, str], Any] = {}
    totals = {"AGGREGATING": 0.0, "APPLYING": 0.0}
    for round_id, status, at in rows:
        entered[(round_id, status)] = at
        previous = {"APPLYING": "AGGREGATING", "COMPLETED": "APPLYING"}.get(status)
        if previous and (round_id, previous) in entered:
            totals[previous] += (at - entered[(round_id, previous)]).total_seconds()
    return {"worker_wait": totals["AGGREGATING"], "round_close": totals["APPLYING"]}


def _breakdown(summary: dict[str, Any], rounds: dict[str, float]) -> str:
    phases = summary.get("phase_seconds", {})
    spent = ", ".join(f"{p} {phases.get(p, 0.0):.1f}" for p in PHASES)
    return (
        f"fleet {summary['elapsed_seconds']:.1f} s, of which round close "
        f"{rounds['round_close']:.1f} s and waiting for the worker "
        f"{rounds['worker_wait']:.1f} s; session thread-seconds: {spent}; "
        f"{summary['counts'].get('check_ins', 0)} check-ins; TFLite warm-up "
        f"{summary.get('compute_warmup_seconds', 0.0):.1f} s (untimed)"
    )


def _device_datasets(devices: int, batch_size: int) -> list[Any]:
    """The fleet's training devices (same seed and split) as tf.data datasets."""
    import tensorflow as tf

    from client_sim import data_sources, examples, partitioning

    rng = np.random.default_rng(0)
    source = data_sources.load_digits_source(rng)
    data = data_sources.assign_devices(
        source, devices, partitioning.parse_partition("iid"), rng, eval_device_fraction=0.0
    )
    out = []
    for device in data:
        records = device.records(data_sources.TRAIN)
        parsed = [examples.parse_record(r) for r in records]
        x = np.array([p.features.feature["x"].float_list.value for p in parsed], np.float32)
        y = np.array([p.features.feature["y"].int64_list.value[0] for p in parsed], np.int64)
        ds = tf.data.Dataset.from_tensor_slices((x.reshape(-1, 8, 8, 1), y))
        out.append(ds.batch(batch_size))
    return out


def _tff_timer(
    model_dir: pathlib.Path, config: task_builder_pb2.TaskConfig, devices: int, rounds: int
) -> Callable[[], float]:
    """Composes TFF's learning process and compiles it; returns a timer of R more rounds.

    Each call runs R rounds on K devices drawn per round (one seeded draw sequence across
    calls) from the state the previous call left, and returns their seconds.
    """
    from task_builder import learning_process, model_loading

    model = model_loading.load_model(str(model_dir))
    process = learning_process.compose(model, config, skip_dp_aggregator=False)
    batch = config.policies.dataset_policy.batch_size
    datasets = _device_datasets(devices, batch)
    goal = config.federated_learning.learning_process.runtime_config.report_goal
    rng = np.random.default_rng(1)

    def pick() -> list[Any]:
        return [datasets[i] for i in rng.choice(len(datasets), goal, replace=False)]

    state = process.next(process.initialize(), pick()).state  # compile (untimed)

    def seconds() -> float:
        nonlocal state
        started = time.perf_counter()
        for _ in range(rounds):
            state = process.next(state, pick()).state
        return time.perf_counter() - started

    return seconds


def run(quick: bool) -> list[Figure]:
    """R rounds of K clients through the fleet and through TFF."""
    from task_builder import model_loading, plans, tff_runtime
    from task_builder.examples import save_models

    tff_runtime.install_reaper()
    goal, rounds, devices = (4, 2, 12) if quick else (10, 5, 40)
    config = _config(goal, rounds)
    with tempfile.TemporaryDirectory(prefix="fcp-b7-") as tmp:
        root = pathlib.Path(tmp)
        # The worker_binary is ended at exit (install_reaper); see b2_tff_aggregation.
        model_dir = save_models.save_example("digits_cnn", root / "models")
        built = plans.build_plans(
            model_loading.load_model(str(model_dir)),
            config,
            skip_dp_aggregator=False,
            skip_flex_ops_check=False,
        )
        training = built.training
        if training is None or training.initial_checkpoint is None:
            raise RuntimeError("the builder made no training plan or initial checkpoint")
        # TFF is timed once before the fleet and once after, and its faster time counts: a
        # baseline caught in a slow moment (this machine's speed drifts within a minute)
        # would flatter the fleet.
        tff = _tff_timer(model_dir, config, devices, rounds)
        tff_runs = [tff()]
        database_url = servers.sqlite_database(root)
        env = {
            **servers.server_env(database_url, root / "blobs"),
            "FCP_WORKER_INTERVAL_SECONDS": str(WORKER_INTERVAL_S),
            "FCP_WORKER_CLOSE_POLL_SECONDS": str(WORKER_CLOSE_POLL_S),
        }
        worker_log = (root / "worker.log").open("ab")
        worker = subprocess.Popen(
            [sys.executable, "-m", "fcp_server.cli", "worker"],
            cwd=servers.ROOT,
            env=env,
            stdout=worker_log,
            stderr=worker_log,
            start_new_session=True,
        )
        try:
            with (
                servers.gunicorn("fcp_server.app:create_app()", env, root / "web.log") as (url, _),
                httpx.Client(base_url=url, timeout=60) as http,
            ):
                servers.register_task(
                    http,
                    POP,
                    _task(config, training.min_client_version),
                    training.server_plan,
                    training.client_plan,
                    training.initial_checkpoint,
                )
                summary = _fleet_summary(url, devices, rounds)
        finally:
            servers.stop_group(worker)
            worker_log.close()
        tff_runs.append(tff())
        breakdown = _breakdown(summary, round_phase_seconds(database_url))
        ours_s = task_completed_unix_seconds(database_url) - float(summary["started_unix_seconds"])
    if not 0 < ours_s <= float(summary["elapsed_seconds"]) + 0.01:
        raise RuntimeError(f"the task completed {ours_s:.3f} s after the fleet started?")
    theirs_s = min(tff_runs)
    updates = goal * rounds
    return [
        Figure(
            benchmark="B7",
            name=f"fleet over HTTP vs TFF, digits CNN, {rounds} rounds x {goal} clients",
            ours=updates / ours_s,
            unit="updates/s",
            baseline=updates / theirs_s,
            baseline_name="TFF 0.87 simulation of the same rounds (C++ context)",
            target_on="ratio",
            target=1.0,
            direction="higher",
            notes="fleet: client-sim 8 threads + 2 TFLite processes in the runner, gunicorn "
            "2 workers + 1 worker process, round close includes DP accounting; TFF: runner "
            "process + worker_binary, no accounting; same 2 cores; TFF timed before and "
            f"after the fleet ({tff_runs[0]:.2f} / {tff_runs[1]:.2f} s), the faster "
            f"counts; the fleet's {ours_s:.2f} s end when the server completed the last round "
            f"(the runner saw it {float(summary['elapsed_seconds']) - ours_s:.2f} s later). "
            f"{breakdown}",
        )
    ]
