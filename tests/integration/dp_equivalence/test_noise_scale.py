"""Noise on: each DP type's per-round noise has TFF's scale, on the server and in TFF itself.

One TaskConfig per type feeds both sides: TFF's aggregator as the task builder builds it
(`learning_process.build_dp_aggregator`, a `DifferentiallyPrivateFactory`) and the server's
round close (`RoundAccumulator` + `finalize_round`) on the AggregationSpec the builder writes
into the server plan. Every client sends zeros, so each round's output is the noise on the
mean. Its per-coordinate variance must be, on both sides, within 5 standard errors of

    (value_z * clip / clients_per_round)^2 * tree_factor(round)

where value_z is z for the fixed-clip types and TFF's split of z between value and count
noise (`adaptive_clip_noise_params`) for the adaptive ones, and tree_factor is the efficient
tree's residual variance (1 for the Gaussian types; 1, 1, 1, 1.38, ... for the trees). With
40,000 coordinates the tolerance is 3.5%: a missing `/ clients_per_round`, a factor 2 or z in
place of value_z (x2.04 in variance with the count stddev used here) all fail.

The clipped-count noise of the adaptive types is one scalar per round, so it is measured over
thousands of rounds of the server's query, against TFF's default count stddev.
"""

import math

import numpy as np
import pytest

pytest.importorskip("tensorflow_federated")

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.aggregators.differential_privacy import (
    adaptive_clip_noise_params,
)

from fcp_server.aggregation import (
    ModelWeights,
    RoundAccumulator,
    ServerState,
    finalize_round,
    optimizers,
    queries,
)
from fcp_server.aggregation.state import ClientUpdate
from fcp_server.protos import plan_pb2, task_builder_pb2
from task_builder import learning_process, server_plan, task_config
from tests.integration.dp_equivalence import task_setup
from tests.integration.dp_equivalence.task_setup import Dp
from tests.unit.aggregation.test_tree_noise import residual_variance

pytestmark = pytest.mark.tf

SIZE = 40_000
CLIENTS = 4
Z = 1.0
# value_z = (Z^-2 - (2 x 0.7)^-2)^-1/2 = 1.43 Z: the split is plainly visible in the variance.
COUNT_STDDEV = 0.7
ROUNDS = 6
ADAPTIVE = (Dp.ADAPTIVE_GAUSSIAN, Dp.ADAPTIVE_TREE)
TREES = (Dp.TREE_AGGREGATION, Dp.ADAPTIVE_TREE)
ALL_TYPES = (Dp.FIXED_GAUSSIAN, Dp.ADAPTIVE_GAUSSIAN, Dp.TREE_AGGREGATION, Dp.ADAPTIVE_TREE)


def _config(
    dp_type: int, *, clients: int, count_stddev: float = 0.0
) -> task_builder_pb2.TaskConfig:
    config = task_setup.make_config(dp_type, noise_multiplier=Z)
    config.federated_learning.learning_process.runtime_config.report_goal = clients
    config.differential_privacy.clipped_count_stddev = count_stddev  # 0: the default
    return task_config.validate_and_normalize(config)


def _server_plan(config: task_builder_pb2.TaskConfig) -> plan_pb2.ServerPlan:
    """A one-tensor model of SIZE coordinates with the builder's AggregationSpec."""
    plan = plan_pb2.ServerPlan(
        kind=plan_pb2.PlanKind.TRAINING,
        aggregation=server_plan.aggregation_spec(config, skip_dp_aggregator=False),
        report_goal=CLIENTS,
        server_optimizer=plan_pb2.OptimizerSpec(
            type=task_builder_pb2.Optimizer.SGD, learning_rate=1.0
        ),
    )
    plan.model.trainable.add(name="trainable/0", shape=[SIZE], dtype="float32")
    return plan


def _server_rounds(config: task_builder_pb2.TaskConfig) -> list[tuple[float, float]]:
    """(noise variance per coordinate, clip used) of each round closed by the server code."""
    plan = _server_plan(config)
    weights = (np.zeros(SIZE, np.float32),)
    optimizer = optimizers.build_server_optimizer(plan.server_optimizer)
    state = ServerState(ModelWeights(weights, ()), optimizer.initialize(weights), {})
    zero = ClientUpdate(trainable=weights, num_examples=1, metrics={})
    rng = np.random.default_rng(11)
    out = []
    for _ in range(ROUNDS):
        acc = RoundAccumulator(plan, state.aggregator_state)
        for _ in range(CLIENTS):
            acc.add(zero)
        outcome = finalize_round(acc, state, plan, rng)
        (noise,) = outcome.mean_update
        clip = outcome.metrics["server/aggregator/dp/clip_norm"]
        out.append((float(np.mean(noise.astype(np.float64) ** 2)), clip))
        state = outcome.new_state
    return out


def _next_clip(dp_type: int, measurements: dict, clip: float) -> float:
    if dp_type == Dp.ADAPTIVE_GAUSSIAN:
        return float(measurements["dp_query_metrics"]["clip"])
    if dp_type == Dp.ADAPTIVE_TREE:
        return float(measurements["zeroing"]["dp_query_metrics"]["current_clip"])
    return clip


def _tff_rounds(config: task_builder_pb2.TaskConfig) -> list[tuple[float, float]]:
    """(noise variance per coordinate, clip used) of each round of TFF's aggregator."""
    settings = learning_process.dp_settings(config)
    factory = learning_process.build_dp_aggregator(settings, (tf.TensorSpec([SIZE], tf.float32),))
    process = factory.create(tff.StructWithPythonType([tff.TensorType(np.float32, [SIZE])], tuple))
    state = process.initialize()
    zero = (np.zeros(SIZE, np.float32),)
    clip = settings.clip_norm
    out = []
    for _ in range(ROUNDS):
        output = process.next(state, [zero] * CLIENTS)
        (noise,) = output.result
        out.append((float(np.mean(np.asarray(noise, np.float64) ** 2)), clip))
        clip = _next_clip(settings.dp_type, output.measurements, clip)
        state = output.state
    return out


def _value_noise_multiplier(dp_type: int) -> float:
    if dp_type in ADAPTIVE:
        value_z, _ = adaptive_clip_noise_params(Z, float(CLIENTS), COUNT_STDDEV)
        return float(value_z)
    return Z


@pytest.mark.parametrize("dp_type", ALL_TYPES, ids=Dp.Enum.Name)
def test_per_round_noise_variance_is_tffs_on_the_server_and_in_tff(dp_type):
    # Arrange.
    config = _config(dp_type, clients=CLIENTS, count_stddev=COUNT_STDDEV)
    value_z = _value_noise_multiplier(dp_type)
    tolerance = 5 * math.sqrt(2 / SIZE)

    # Act.
    sides = {"server": _server_rounds(config), "tff": _tff_rounds(config)}

    # Assert.
    for side, rounds in sides.items():
        for r, (variance, clip) in enumerate(rounds):
            factor = residual_variance(r, 1.0) if dp_type in TREES else 1.0
            expected = (value_z * clip / CLIENTS) ** 2 * factor
            assert variance == pytest.approx(expected, rel=tolerance), f"{side}, round {r + 1}"
    if dp_type in TREES:
        assert residual_variance(3, 1.0) > 1.3  # round 4 differs: the tree shape is tested


def _count_noise_draws(spec: plan_pb2.AggregationSpec, rounds: int, runs: int) -> np.ndarray:
    """The clipped-count noise of `runs` independent tasks of `rounds` rounds, shape (runs, rounds).

    Half of the clients_per_round records are below the threshold, so the shifted count is 0
    and the quantile estimate is 0.5 + noise / clients_per_round (far from the [0, 1] clamp).
    """
    m = int(spec.clients_per_round)
    draws = np.zeros((runs, rounds))
    rng = np.random.default_rng(5)
    total = (np.zeros(1),)
    for run in range(runs):
        state: dict = {}
        for r in range(rounds):
            query = queries.make_query(spec, state)
            result = query.finalize(total, m, rng, below_threshold=m // 2)
            fraction = result.metrics["dp/unclipped_quantile_estimate"]
            draws[run, r] = (fraction - 0.5) * m
            state = result.state
    return draws


@pytest.mark.parametrize("dp_type", ADAPTIVE, ids=Dp.Enum.Name)
def test_clipped_count_noise_has_tffs_default_stddev(dp_type):
    # Arrange: the default count stddev (config field unset), as TFF's factories choose it.
    clients = 100
    config = _config(dp_type, clients=clients)
    spec = server_plan.aggregation_spec(config, skip_dp_aggregator=False)
    _, count_stddev = adaptive_clip_noise_params(Z, float(clients))
    trees = dp_type == Dp.ADAPTIVE_TREE
    rounds, runs = (4, 1500) if trees else (1, 4000)

    # Act.
    draws = _count_noise_draws(spec, rounds, runs)

    # Assert: each round's count noise variance, tree-shaped for ADAPTIVE_TREE.
    tolerance = 5 * math.sqrt(2 / runs)
    for r in range(rounds):
        factor = residual_variance(r, 1.0) if trees else 1.0
        expected = count_stddev**2 * factor
        assert np.mean(draws[:, r] ** 2) == pytest.approx(expected, rel=tolerance), r
