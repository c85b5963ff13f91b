"""Every DP aggregator, noise off: the FCP server's global weights equal TFF's, round by round.

One TaskConfig (the dense_dict example, `task_setup`) per DP type is built by the task
builder into the TFLite device plan and the server plan; the same config is composed into
TFF's own learning process (`learning_process.compose`: `build_unweighted_fed_avg` with the
`DifferentiallyPrivateFactory` aggregator, tree types inside `zeroing_factory(100 x clip)`).
Both run the same clients in the same order on the same records; after every round the
server's checkpointed weights must equal TFF's within 1e-5 relative.

How noise is switched off, with the builder's own code paths:

* `noise_multiplier: 0` in the config. The builder's DP step would treat 0 as "calibrate to
  the epsilon target", so the test runs the steps around it (validate and normalize, build the
  plans) and skips that one. Zero noise has infinite epsilon, so the server would refuse to
  open the task; the server plan's `dp_target_epsilon` is cleared (no budget stop), the only
  field changed after the build.
* Adaptive types: the config cannot say "no clipped-count noise" (0 means the default
  clients_per_round / 20), so `clipped_count_stddev` is 1e-12. On a count of 3 records that
  noise moves the quantile estimate by ~1e-12, far below the tolerance.
* ADAPTIVE_TREE restarts its trees after round 128, then every 1024 rounds; the test lowers
  the builder's two restart constants (monkeypatched in `learning_process`, read by both the
  TFF composition and the server plan) so restarts happen after rounds 2 and 5.

The data makes every stage matter: clipping is active for some clients and not others, and
one client's update exceeds the tree types' zeroing norm (checked below).
"""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("tensorflow_federated")

from fcp_server.protos import task_builder_pb2
from task_builder import learning_process, plans, task_config, tasks
from tests.integration.dp_equivalence import task_setup
from tests.integration.dp_equivalence.reference_process import client_datasets, run_reference
from tests.integration.dp_equivalence.server_rounds import RoundResult, running_server
from tests.integration.dp_equivalence.task_setup import CLIP, SCHEDULE, Dp

pytestmark = [pytest.mark.tf, pytest.mark.slow]

RTOL = 1e-5
TINY_COUNT_STDDEV = 1e-12
ADAPTIVE = (Dp.ADAPTIVE_GAUSSIAN, Dp.ADAPTIVE_TREE)
TREES = (Dp.TREE_AGGREGATION, Dp.ADAPTIVE_TREE)


@dataclasses.dataclass(frozen=True)
class Built:
    """The normalized config and the training plans the task builder made from it."""

    config: task_builder_pb2.TaskConfig
    plans: plans.TaskPlans


def _build(model, dp_type: int) -> Built:
    config = task_setup.make_config(dp_type, noise_multiplier=0.0)
    if dp_type in ADAPTIVE:
        config.differential_privacy.clipped_count_stddev = TINY_COUNT_STDDEV
    config = task_config.validate_and_normalize(config)
    built = plans.build_plans(model, config, skip_dp_aggregator=False, skip_flex_ops_check=False)
    assert built.training is not None
    built.training.server_plan.aggregation.dp_target_epsilon = 0.0  # see the module docstring
    return Built(config, built.training)


def _run_server(settings, built: Built, clients) -> list[RoundResult]:
    task = tasks.build_tasks(built.config).training
    assert task is not None
    with running_server(settings) as server:
        opened = server.register(built.config.population_name, task, built.plans)
        return [
            server.run_round(opened, built.plans.server_plan, [clients[c] for c in who], n)
            for n, who in enumerate(SCHEDULE, start=1)
        ]


def _assert_close(got: list[np.ndarray], want: list[np.ndarray], round_number: int) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        # Relative to the tensor's scale: elements near zero have no meaningful relative error.
        scale = float(np.max(np.abs(w)))
        np.testing.assert_allclose(
            g, w, rtol=RTOL, atol=RTOL * scale, err_msg=f"round {round_number}, tensor {i}"
        )


@pytest.mark.parametrize(
    "dp_type",
    [Dp.FIXED_GAUSSIAN, Dp.ADAPTIVE_GAUSSIAN, Dp.TREE_AGGREGATION, Dp.ADAPTIVE_TREE],
    ids=Dp.Enum.Name,
)
def test_server_rounds_equal_tffs_learning_process_with_noise_off(
    dense_model, server_settings, monkeypatch, dp_type
):
    # Arrange: the builder's plans and TFF's process from one config; the same client data.
    monkeypatch.setattr(learning_process, "TREE_RESTART_WARMUP", 2)
    monkeypatch.setattr(learning_process, "TREE_RESTART_FREQUENCY", 3)
    built = _build(dense_model, dp_type)
    clients = task_setup.client_records()
    datasets = client_datasets(dense_model, built.config, built.plans.client_plan, clients)

    # Act.
    reference = run_reference(dense_model, built.config, datasets, SCHEDULE)
    served = _run_server(server_settings, built, clients)

    # Assert: the weights after every round.
    for n, (ours, theirs) in enumerate(zip(served, reference, strict=True), start=1):
        _assert_close(list(ours.state.weights.trainable), theirs.weights, n)
    # The same clips, restarts and zeroing decisions as TFF, and each of them mattered.
    metrics = [r.metrics for r in served]
    _assert_same_clip_path(dp_type, metrics, [r.aggregator for r in reference])
    zeroed = [m["server/aggregator/zeroed_count"] for m in metrics]
    if dp_type in TREES:
        assert zeroed == [float(r.aggregator["zeroed_count"]) for r in reference]
        assert sum(zeroed) > 0
    else:
        assert sum(zeroed) == 0
    above, below = _clip_activity(served)
    assert above > sum(zeroed) and below > 0


def _clip_activity(served: list[RoundResult]) -> tuple[int, int]:
    """Counts device updates (before any clipping) above and at or below their round's clip."""
    above = below = 0
    for result in served:
        clip = result.metrics["server/aggregator/dp/clip_norm"]
        above += sum(norm > clip for norm in result.update_norms)
        below += sum(0.0 < norm <= clip for norm in result.update_norms)
    return above, below


def _assert_same_clip_path(dp_type: int, ours: list[dict], theirs: list[dict]) -> None:
    """The clip (and quantile estimate) each side carries into the next round."""
    for m, agg in zip(ours, theirs, strict=True):
        if dp_type == Dp.ADAPTIVE_GAUSSIAN:
            want = float(agg["dp_query_metrics"]["clip"])
            assert m["server/aggregator/dp/next_clip_norm"] == pytest.approx(want, rel=RTOL)
        elif dp_type == Dp.ADAPTIVE_TREE:
            query = agg["zeroing"]["dp_query_metrics"]
            clip, estimate = float(query["current_clip"]), float(query["estimate_clip"])
            assert m["server/aggregator/dp/next_clip_norm"] == pytest.approx(clip, rel=RTOL)
            assert m["server/aggregator/dp/clip_estimate"] == pytest.approx(estimate, rel=RTOL)
        else:
            assert m["server/aggregator/dp/clip_norm"] == CLIP
    if dp_type == Dp.ADAPTIVE_TREE:
        restarts = [m["server/aggregator/dp/tree_restarted"] for m in ours]
        assert restarts == [0.0, 1.0, 0.0, 0.0, 1.0]  # after rounds 2 and 5
