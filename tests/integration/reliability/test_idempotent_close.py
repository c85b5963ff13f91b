"""A round close killed mid-publish is re-run and publishes the same noisy result, not a new one.

The real `fcp-server worker --once` aggregates a DP round and SIGKILLs itself at a fault point
between its blob writes; a worker started afterwards recovers the claim and finishes. Privacy
requires that round 1 is released once: every output present after the kill keeps its bytes,
and all outputs are the staged ones (`round_outputs`).
"""

import dataclasses
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from fcp_server import checkpoints
from fcp_server.app import create_app, worker_deps
from fcp_server.clock import ManualClock
from fcp_server.protos import task_builder_pb2
from fcp_server.services import blob_paths, round_outputs
from fcp_server.storage.blobs import make_blob_store
from fcp_server.storage.models import Round, RoundStatus
from fcp_server.worker import Worker
from tests.integration.server import testkit
from tests.integration.server.testkit import POP

OUTPUTS = {
    "server": blob_paths.server_checkpoint_blob,
    "client": blob_paths.client_checkpoint_blob,
    "metrics": blob_paths.metrics_blob,
    "staged": blob_paths.staged_outputs_blob,
}
PLAN = testkit.server_plan(
    report_goal=2,
    dp_type=task_builder_pb2.DpAggregator.FIXED_GAUSSIAN,
    noise_multiplier=1.0,
    clip_norm=1.0,
)


def _worker_once(settings, fault: str, tmp_path: Path) -> int:
    env = {
        **os.environ,
        "FCP_DATABASE_URL": settings.database_url,
        "FCP_BLOB_URL": settings.blob_url,
        "FCP_LOG_FORMAT": "text",
        "FCP_FAULT_POINT": fault,
        "FCP_FAULT_LOG": str(tmp_path / "faults"),
    }
    exe = Path(sys.executable).parent / "fcp-server"
    return subprocess.run([str(exe), "worker", "--once"], env=env, check=False).returncode


@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    [
        "close.after_stage",
        "close.after_server_checkpoint",
        "close.after_client_checkpoint",
        "close.after_metrics",
    ],
)
def test_a_killed_close_republishes_the_same_noisy_result(settings, tmp_path, point):
    # Arrange: round 1 of a DP task has its two updates.
    root = tmp_path / "blobs"
    settings = dataclasses.replace(settings, blob_url=root.as_uri())
    clock = ManualClock(dt.datetime.now(dt.UTC))  # the subprocess worker reads the real time
    app = create_app(settings, clock=clock)
    ctx = app.extensions["fcp"]
    api = testkit.Api(app.test_client())
    api.open_training(testkit.training_task(report_goal=2), plan=PLAN)
    api.contribute(testkit.update_bytes(0.1, 0.1))
    api.contribute(testkit.update_bytes(0.2, 0.3))
    blobs = make_blob_store(root.as_uri())
    names = {kind: blob(POP, 1, 1) for kind, blob in OUTPUTS.items()}

    # Act: the real worker dies at `point`; what it left is kept; a new worker finishes.
    assert _worker_once(settings, f"{point}:1", tmp_path) == -9
    before = {kind: blobs.get(name) for kind, name in names.items() if blobs.exists(name)}
    clock.advance(settings.apply_lease_seconds + 60)
    report = Worker(worker_deps(ctx)).tick()

    # Assert
    assert (report.recovered_applies, report.rounds_closed) == (1, 1)
    after = {kind: blobs.get(name) for kind, name in names.items()}
    assert {kind: after[kind] for kind in before} == before  # nothing was published twice
    staged = round_outputs.decode(after["staged"])
    assert after["server"] == staged.server_checkpoint
    assert after["client"] == staged.client_checkpoint
    assert after["metrics"] == round_outputs.metrics_json(staged.metrics)
    server = checkpoints.decode_server_checkpoint(after["server"], PLAN).weights.trainable
    client = checkpoints.decode_client_checkpoint(after["client"], PLAN).trainable
    assert all(np.array_equal(s, c) for s, c in zip(server, client, strict=True))
    with ctx.database.sessions() as session:
        rnd = session.scalar(select(Round).where(Round.iteration_id == 1))
        assert (rnd.status, rnd.apply_attempts) == (RoundStatus.COMPLETED, 2)
    ctx.database.dispose()
