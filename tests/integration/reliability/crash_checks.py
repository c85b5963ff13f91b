"""What must hold after a crash campaign, checked from the database, the blobs and the ledger.

* every round of every task COMPLETED exactly once (no failed or retried attempt), each task
  COMPLETED;
* exactly once: per round, the assignments the database counted are exactly the ones whose
  devices got a 204, `report_goal` of them, and the published aggregate is theirs (the
  metrics' loss is the mean of their unique loss totals; the weights moved by the mean of
  their unique deltas plus the noise);
* no half-written blob: every blob reads back whole with its recorded SHA-256, every
  checkpoint and metrics file decodes, and the staged outputs are what was published;
* the DP noise continues: each round's noise is fresh (no two rounds share a noise vector),
  has the planned scale, and a round whose close was killed after writing outputs published
  the same bytes as before the kill (never a second noisy result).
"""

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
from sqlalchemy import select

from fcp_server import checkpoints
from fcp_server.protos import plan_pb2
from fcp_server.services import blob_paths, round_outputs
from fcp_server.storage import db as fcp_db
from fcp_server.storage.blobs_local import LocalBlobStore
from fcp_server.storage.models import Assignment, AssignmentStatus, Round, RoundStatus, Task
from tests.integration.reliability import http_devices
from tests.integration.reliability.crash_campaign import Config, Result, dp_plan
from tests.integration.server import testkit

LOSS = "server/client_work/train/loss"
NUM_CLIENTS = "server/aggregator/num_clients"


@dataclasses.dataclass(frozen=True)
class Figures:
    """The numbers a campaign reports."""

    rounds: int
    accepted_updates: int
    noise_samples: int
    noise_std: float
    snapshots_compared: int
    temp_files_left: int
    max_apply_attempts: int


def _trainable(data: bytes, plan: plan_pb2.ServerPlan) -> np.ndarray:
    state = checkpoints.decode_server_checkpoint(data, plan)
    return np.concatenate([t.reshape(-1).astype(np.float64) for t in state.weights.trainable])


def _check_blobs_whole(blobs: LocalBlobStore) -> int:
    for name in blobs.list(""):
        raw = blobs.get_raw(name)
        content = blobs.get(name)
        assert hashlib.sha256(content).hexdigest() == raw.info.sha256, f"{name} is damaged"
    return sum(1 for _ in Path(blobs.root).rglob(".*.tmp"))


def _check_round(
    blobs: LocalBlobStore, ids: tuple[str, int, int], accepted: list[int], plan: plan_pb2.ServerPlan
) -> dict[str, float]:
    metrics = json.loads(blobs.get(blob_paths.metrics_blob(*ids)))
    staged = round_outputs.decode(blobs.get(blob_paths.staged_outputs_blob(*ids)))
    assert staged.server_checkpoint == blobs.get(blob_paths.server_checkpoint_blob(*ids)), ids
    assert staged.client_checkpoint == blobs.get(blob_paths.client_checkpoint_blob(*ids)), ids
    assert round_outputs.metrics_json(staged.metrics) == blobs.get(blob_paths.metrics_blob(*ids))
    checkpoints.decode_client_checkpoint(blobs.get(blob_paths.client_checkpoint_blob(*ids)), plan)
    assert metrics[NUM_CLIENTS] == len(accepted), (ids, metrics[NUM_CLIENTS])
    expected_loss = sum(accepted) / len(accepted)
    assert abs(metrics[LOSS] - expected_loss) < 1e-3 * max(1.0, expected_loss), (ids, metrics)
    return metrics


def verify(result: Result, db_url: str, blobs: LocalBlobStore, config: Config) -> Figures:
    """Checks every invariant of the module docstring; returns the campaign's figures."""
    plan = dp_plan(config)
    sigma = 1.0 * 1.0 / config.report_goal  # z * clip / report_goal
    by_round: dict[tuple[int, int], dict[str, int]] = {}
    for a in result.ledger.accepted:
        by_round.setdefault((a.task_id, a.iteration), {})[a.assignment_id] = a.uid
    assert not result.ledger.server_errors, result.ledger.server_errors[:5]

    database = fcp_db.connect(db_url)
    noises: list[np.ndarray] = []
    rounds_seen = max_attempts = 0
    try:
        with database.sessions() as session:
            for task in session.scalars(select(Task).order_by(Task.id)):
                assert task.status.value == "COMPLETED", (task.task_id, task.status_reason)
                rows = session.scalars(
                    select(Round).where(Round.task_pk == task.id).order_by(Round.iteration_id)
                ).all()
                assert [r.iteration_id for r in rows] == list(range(1, task.total_iteration + 1))
                previous = np.concatenate([w.reshape(-1) for w in testkit.initial_weights()])
                for rnd in rows:
                    assert rnd.status == RoundStatus.COMPLETED, (rnd.iteration_id, rnd.status)
                    assert rnd.aggregated_count == rnd.reported_count == config.report_goal
                    counted = set(
                        session.scalars(
                            select(Assignment.id).where(
                                Assignment.round_pk == rnd.id,
                                Assignment.status == AssignmentStatus.UPLOAD_COMPLETED,
                            )
                        )
                    )
                    acked = by_round.get((task.task_id, rnd.iteration_id), {})
                    assert counted == set(acked), (
                        f"task {task.task_id} round {rnd.iteration_id}: counted {sorted(counted)}"
                        f" but devices were acknowledged for {sorted(acked)}"
                    )
                    ids = (task.population_name, task.task_id, rnd.iteration_id)
                    _check_round(blobs, ids, list(acked.values()), plan)
                    weights = _trainable(blobs.get(blob_paths.server_checkpoint_blob(*ids)), plan)
                    mean_delta = np.mean([http_devices.uid_delta(u) for u in acked.values()])
                    # SGD with learning rate 1: w_n = w_{n-1} - (mean delta + noise).
                    noises.append(previous - weights - mean_delta)
                    previous = weights
                    max_attempts = max(max_attempts, rnd.apply_attempts)
                    rounds_seen += 1
    finally:
        database.dispose()

    for noise in noises:
        assert np.all(np.isfinite(noise)) and np.any(noise != 0.0), noise
        assert np.max(np.abs(noise)) < 8 * sigma, (noise, sigma)
    for a, b in itertools.combinations(noises, 2):
        assert not np.allclose(a, b, rtol=0, atol=1e-6), "two rounds reused the same noise"
    samples = np.concatenate(noises)
    std = float(np.std(samples))
    if samples.size >= 40:  # chi-square: outside [0.6, 1.5] sigma is vanishingly unlikely
        assert 0.6 * sigma < std < 1.5 * sigma, (std, sigma)

    compared = 0
    for name, seen in result.snapshots.items():
        final = blobs.get(name)
        for before in seen:
            assert before == final, f"{name} changed after a kill: a second result was published"
            compared += 1
    return Figures(
        rounds=rounds_seen,
        accepted_updates=len(result.ledger.accepted),
        noise_samples=int(samples.size),
        noise_std=std,
        snapshots_compared=compared,
        temp_files_left=_check_blobs_whole(blobs),
        max_apply_attempts=max_attempts,
    )
