import math

import numpy as np
import pytest

from fcp_server.aggregation import fedavg, optimizers
from fcp_server.aggregation import metrics as agg_metrics
from fcp_server.aggregation.accumulator import RoundAccumulator
from fcp_server.aggregation.state import ClientUpdate, ModelWeights, ServerState
from fcp_server.protos import plan_pb2, task_builder_pb2
from tests.unit.aggregation import reference_dp
from tests.unit.aggregation.plan_builders import (
    AUC_STATE,
    TRAINABLE_SHAPES,
    constant_update,
    make_plan,
    make_update,
    random_weights,
)

DpType = task_builder_pb2.DpAggregator


def _state(plan: plan_pb2.ServerPlan, rng: np.random.Generator) -> ServerState:
    weights = random_weights(rng)
    optimizer = optimizers.build_server_optimizer(plan.server_optimizer)
    return ServerState(weights, optimizer.initialize(weights.trainable), {}, round_num=2)


def _close(
    plan: plan_pb2.ServerPlan,
    updates: list[ClientUpdate],
    state: ServerState,
    rng: np.random.Generator,
) -> fedavg.RoundOutcome:
    acc = RoundAccumulator(plan)
    for update in updates:
        acc.add(update)
    return fedavg.finalize_round(acc, state, plan, rng)


@pytest.mark.parametrize("dp_type", [DpType.UNKNOWN, DpType.FIXED_GAUSSIAN])
def test_fedavg_of_identical_updates_returns_the_update(dp_type):
    rng = np.random.default_rng(0)
    plan = make_plan(dp_type=dp_type, noise_multiplier=0.0, clip_norm=10.0, clients_per_round=3)
    state = _state(plan, rng)
    outcome = _close(plan, [constant_update(0.25)] * 3, state, rng)
    for mean, shape in zip(outcome.mean_update, TRAINABLE_SHAPES, strict=True):
        np.testing.assert_allclose(mean, np.full(shape, 0.25), rtol=1e-6)
    # SGD with learning rate 1 subtracts the update (TFF's sign convention).
    for new, old in zip(outcome.new_state.weights.trainable, state.weights.trainable, strict=True):
        np.testing.assert_allclose(new, old - 0.25, rtol=1e-6)
    assert outcome.new_state.weights.non_trainable == state.weights.non_trainable
    assert outcome.new_state.round_num == 3
    assert outcome.metrics["server/finalizer/update_non_finite"] == 0.0


def test_noise_std_of_the_mean_is_z_c_over_n():
    z, clip, n = 1.3, 0.5, 4
    plan = make_plan(
        noise_multiplier=z,
        clip_norm=clip,
        clients_per_round=n,
        trainable_shapes=[(100_000,)],
        with_metrics=False,
    )
    rng = np.random.default_rng(7)
    weights = ModelWeights((np.zeros(100_000, np.float32),), (np.zeros(2, np.float32),))
    state = ServerState(weights, {}, {})
    zero = make_update((np.zeros(100_000, np.float32),), with_metrics=False)
    outcome = _close(plan, [zero] * n, state, rng)
    (noise,) = outcome.mean_update
    expected = z * clip / n
    size = noise.size
    assert abs(noise.std() - expected) < 6 * expected / math.sqrt(2 * size)
    assert abs(noise.mean()) < 6 * expected / math.sqrt(size)
    assert outcome.metrics["server/aggregator/dp/noise_stddev"] == pytest.approx(expected)


def test_one_huge_adversarial_update_moves_the_mean_by_at_most_c_over_n():
    clip, n = 0.7, 4
    plan = make_plan(noise_multiplier=0.0, clip_norm=clip, clients_per_round=n)
    rng = np.random.default_rng(3)
    state = _state(plan, rng)
    honest = [
        make_update(tuple(rng.normal(size=s).astype(np.float32) for s in TRAINABLE_SHAPES))
        for _ in range(n - 1)
    ]
    with_adversary = _close(plan, [*honest, constant_update(-1e30)], state, rng)
    with_nothing = _close(plan, [*honest, constant_update(0.0)], state, rng)
    delta = [
        a.astype(np.float64) - b
        for a, b in zip(with_adversary.mean_update, with_nothing.mean_update, strict=True)
    ]
    assert reference_dp.global_l2_norm(delta) <= clip / n * (1 + 1e-5)
    assert with_adversary.metrics["server/aggregator/clipped_count"] >= 1


def test_a_non_finite_aggregate_is_not_applied():
    # Noise this large overflows float32: TFF's reject_non_finite_update keeps the old state.
    plan = make_plan(
        noise_multiplier=1e39, clip_norm=1.0, optimizer=task_builder_pb2.Optimizer.ADAM
    )
    rng = np.random.default_rng(0)
    state = _state(plan, rng)
    outcome = _close(plan, [constant_update(0.1)] * 4, state, rng)
    assert outcome.metrics["server/finalizer/update_non_finite"] == 1.0
    assert outcome.new_state.weights.trainable == state.weights.trainable
    assert int(outcome.new_state.optimizer_state["step"]) == 0
    assert outcome.new_state.round_num == state.round_num + 1


def test_apply_optimizer_rejects_nan_updates():
    plan = make_plan()
    state = _state(plan, np.random.default_rng(0))
    optimizer = optimizers.build_server_optimizer(plan.server_optimizer)
    update = tuple(np.full(s, np.nan, np.float32) for s in TRAINABLE_SHAPES)
    _, weights, rejected = fedavg.apply_optimizer(optimizer, state, update)
    assert rejected
    assert weights == state.weights.trainable


def test_round_metrics_hold_counts_dp_facts_and_finalized_client_metrics():
    plan = make_plan(noise_multiplier=0.5, clip_norm=1.0, clients_per_round=3, zeroing_norm=50)
    rng = np.random.default_rng(1)
    updates = [
        make_update(constant_update(0.01).trainable, num_examples=10, loss=(5.0, 10.0)),
        make_update(constant_update(60.0).trainable, num_examples=20, loss=(30.0, 20.0)),
        make_update(constant_update(2.0).trainable, num_examples=5, loss=(1.0, 5.0)),
    ]
    metrics = _close(plan, updates, _state(plan, rng), rng).metrics
    assert metrics["server/client_work/train/loss"] == pytest.approx(36.0 / 35.0)
    assert metrics["server/client_work/train/num_examples"] == 35.0
    # Every device reports the same counts: the summed state has the same AUC as one device.
    tp, fp, tn, fn = (np.array(c, np.float64) for c in AUC_STATE)
    expected_auc = agg_metrics.auc_roc(tp, fp, tn, fn)
    assert 0.5 < expected_auc <= 1.0
    assert metrics["server/client_work/train/auc"] == pytest.approx(expected_auc)
    assert metrics["server/aggregator/num_clients"] == 3.0
    assert metrics["server/aggregator/zeroed_count"] == 1.0
    assert metrics["server/aggregator/clipped_count"] == 1.0
    assert metrics["server/aggregator/non_finite_count"] == 0.0
    assert metrics["server/aggregator/dp/noise_multiplier"] == 0.5
    assert metrics["server/aggregator/dp/clip_norm"] == 1.0
    assert metrics["server/aggregator/dp/noise_stddev"] == pytest.approx(0.5 / 3)


def test_fewer_updates_than_planned_are_logged(caplog):
    plan = make_plan(clients_per_round=5)
    rng = np.random.default_rng(0)
    with caplog.at_level("WARNING"):
        _close(plan, [constant_update(0.1)] * 2, _state(plan, rng), rng)
    assert "plan expects 5" in caplog.text


def test_adam_server_optimizer_advances_its_state():
    plan = make_plan(optimizer=task_builder_pb2.Optimizer.ADAM, learning_rate=0.01)
    rng = np.random.default_rng(0)
    state = _state(plan, rng)
    outcome = _close(plan, [constant_update(0.1)] * 4, state, rng)
    assert int(outcome.new_state.optimizer_state["step"]) == 1
    assert set(outcome.new_state.optimizer_state) == set(state.optimizer_state)


def test_an_empty_round_or_mismatched_state_is_an_error():
    plan = make_plan()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="without any update"):
        fedavg.finalize_round(RoundAccumulator(plan), _state(plan, rng), plan, rng)
    acc = RoundAccumulator(plan)
    acc.add(constant_update(0.1))
    wrong = ServerState(ModelWeights((np.zeros(4, np.float32),), ()), {}, {})
    with pytest.raises(ValueError, match="shapes"):
        fedavg.finalize_round(acc, wrong, plan, rng)


def test_evaluation_rounds_finalize_metrics_only():
    plan = make_plan()
    plan.kind = plan_pb2.PlanKind.EVALUATION
    acc = RoundAccumulator(plan)
    report = make_update((), num_examples=8, loss=(4.0, 8.0))
    acc.add(report)
    acc.add(make_update((), num_examples=2, loss=(6.0, 2.0)))
    values = fedavg.finalize_evaluation(acc, plan)
    assert values["server/client_work/eval/loss"] == pytest.approx(1.0)
    assert values["server/client_work/eval/num_examples"] == 10.0
    assert values["server/aggregator/num_clients"] == 2.0
    with pytest.raises(ValueError, match="EVALUATION plan has no model update"):
        rng = np.random.default_rng(0)
        fedavg.finalize_round(acc, _state(make_plan(), rng), plan, rng)
    with pytest.raises(ValueError, match="needs an EVALUATION plan"):
        fedavg.finalize_evaluation(RoundAccumulator(make_plan()), make_plan())
