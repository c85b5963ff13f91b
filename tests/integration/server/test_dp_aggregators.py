"""Every DP aggregator over HTTP, with a server restart between rounds.

Each round runs on a fresh `create_app` over the same database and blob directory, so the
only way the adaptive clip, the quantile estimate and the DP-FTRL noise trees can continue
is through the round's server checkpoint ("aggregator/..." tensors).
"""

import dataclasses
import json

import numpy as np
import pytest

from fcp_server import accounting, checkpoints
from fcp_server.app import create_app, worker_deps
from fcp_server.protos import task_builder_pb2, task_pb2
from fcp_server.services import blob_paths
from fcp_server.storage.blobs import make_blob_store
from fcp_server.worker import Worker
from tests.integration.server import testkit
from tests.integration.server.testkit import POP

Dp = task_builder_pb2.DpAggregator
ROUNDS = 3
# Update sizes per device: some above the initial clip 0.5, some below.
DELTAS = [(0.05, 0.05), (0.4, 0.6)]
# z = 1 with clipped_count_stddev 1 satisfies TFF's z < 2 * clipped_count_stddev rule.
PLANS = {
    Dp.ADAPTIVE_GAUSSIAN: {"init_clip_norm": 0.5, "clipped_count_stddev": 1.0},
    Dp.TREE_AGGREGATION: {"clip_norm": 0.5, "zeroing_norm": 50.0},
    Dp.ADAPTIVE_TREE: {
        "init_clip_norm": 0.5,
        "clipped_count_stddev": 1.0,
        "zeroing_norm": 50.0,
    },
}


@pytest.fixture
def restartable(settings, clock, tmp_path):
    """Builds a new app (and worker) on the same database and blob directory each call."""
    root = tmp_path / "shared-blobs"
    root.mkdir()
    apps = []

    def start():
        app = create_app(
            dataclasses.replace(settings, blob_url=root.as_uri()),
            clock=clock,
            checkin_rng=np.random.default_rng(len(apps)),
        )
        apps.append(app)
        return testkit.Api(app.test_client()), Worker(worker_deps(app.extensions["fcp"]))

    yield start, make_blob_store(root.as_uri())
    for app in apps:
        app.extensions["fcp"].database.dispose()


def _plan(dp_type):
    return testkit.server_plan(
        report_goal=len(DELTAS),
        dp_type=dp_type,
        noise_multiplier=1.0,
        num_rounds=ROUNDS,
        **PLANS[dp_type],
    )


def _run_round(api, worker):
    for d_w, d_b in DELTAS:
        api.contribute(testkit.update_bytes(d_w, d_b))
    assert worker.tick().rounds_closed == 1


@pytest.mark.parametrize("dp_type", list(PLANS), ids=Dp.Enum.Name)
def test_dp_rounds_survive_server_restarts(restartable, dp_type):
    start, blobs = restartable
    plan = _plan(dp_type)
    api, worker = start()
    api.open_training(testkit.training_task(report_goal=len(DELTAS), rounds=ROUNDS), plan=plan)

    metrics, states = [], []
    for n in range(1, ROUNDS + 1):
        if n > 1:
            api, worker = start()  # a restarted server continues from the checkpoint
        _run_round(api, worker)
        metrics.append(json.loads(blobs.get(blob_paths.metrics_blob(POP, 1, n))))
        states.append(
            checkpoints.decode_server_checkpoint(
                blobs.get(blob_paths.server_checkpoint_blob(POP, 1, n)), plan
            ).aggregator_state
        )

    assert api.get_task(1).status == task_pb2.TaskStatus.COMPLETED
    clips = [m["server/aggregator/dp/clip_norm"] for m in metrics]
    assert clips[0] == pytest.approx(0.5)
    setup = accounting.DpSetup.from_spec(plan.aggregation)  # tree types: the RDP tree event
    for n, m in enumerate(metrics, start=1):
        assert m["server/aggregator/num_clients"] == len(DELTAS)
        assert m["server/dp/epsilon_spent"] == pytest.approx(accounting.epsilon_spent(setup, n))
    if dp_type in (Dp.ADAPTIVE_GAUSSIAN, Dp.ADAPTIVE_TREE):
        # The clip used in round n+1 is the one round n chose and checkpointed.
        for n in range(1, ROUNDS):
            chosen = metrics[n - 1]["server/aggregator/dp/next_clip_norm"]
            assert clips[n] == pytest.approx(chosen)
            assert float(states[n - 1]["adaptive/clip"]) == pytest.approx(chosen)
        assert all(
            0.0 <= m["server/aggregator/dp/unclipped_quantile_estimate"] <= 1 for m in metrics
        )
    else:
        assert clips == [0.5] * ROUNDS
    if dp_type in (Dp.TREE_AGGREGATION, Dp.ADAPTIVE_TREE):
        # One leaf per round: the noise tree grew across restarts instead of starting over.
        assert [m["server/aggregator/dp/tree_leaves"] for m in metrics] == [1.0, 2.0, 3.0]
        assert any(k.startswith("tree/") for k in states[-1])
    if dp_type == Dp.ADAPTIVE_TREE:
        assert [int(s["restart/rounds"]) for s in states] == [1, 2, 3]
        for n in range(ROUNDS):
            assert float(states[n]["adaptive/estimate"]) == pytest.approx(
                metrics[n]["server/aggregator/dp/clip_estimate"]
            )
