import dataclasses
import math

import numpy as np
import pytest

from fcp_server import checkpoints
from fcp_server.aggregation import queries, tree_queries
from fcp_server.aggregation.accumulator import RoundAccumulator
from fcp_server.aggregation.state import Tensor
from tests.unit.aggregation import reference_dp
from tests.unit.aggregation.dp_rounds import (
    close_round,
    initial_state,
    make_dp_plan,
    random_updates,
    run_rounds,
)
from tests.unit.aggregation.plan_builders import TRAINABLE_SHAPES, DpType, make_update

TREE = DpType.TREE_AGGREGATION
ADAPTIVE_TREE = DpType.ADAPTIVE_TREE


def constant_update(value: float):
    trainable = tuple(np.full(s, value, np.float32) for s in TRAINABLE_SHAPES)
    return make_update(trainable, with_metrics=False)


def test_without_noise_the_tree_output_is_the_plain_clipped_mean():
    m, clip = 5, 1.0
    plan = make_dp_plan(TREE, noise_multiplier=0.0, clients_per_round=m, clip_norm=clip)
    rng = np.random.default_rng(0)
    rounds = [random_updates(rng, 4) for _ in range(6)]
    for updates, outcome in zip(rounds, run_rounds(plan, rounds, seed=1), strict=True):
        clipped = [reference_dp.clip_l2(u.trainable, clip)[0] for u in updates]
        for i in range(len(TRAINABLE_SHAPES)):
            expected = sum(c[i].astype(np.float64) for c in clipped) / m  # fixed denominator
            np.testing.assert_allclose(outcome.mean_update[i], expected, rtol=1e-6, atol=1e-7)


def test_tree_state_grows_with_the_set_bits_of_the_round_count():
    plan = make_dp_plan(TREE, noise_multiplier=1.0, clients_per_round=3)
    rng = np.random.default_rng(0)
    outcomes = run_rounds(plan, [random_updates(rng, 3) for _ in range(6)], seed=2)
    state = outcomes[-1].new_state.aggregator_state
    # 6 leaves = 0b110: subtrees of 2 and 4 leaves.
    assert state["tree/levels"].tolist() == [1, 2]
    assert state["tree/noise/0"].shape == (2, *TRAINABLE_SHAPES[0])
    assert outcomes[-1].metrics["server/aggregator/dp/tree_leaves"] == 6.0


def test_first_round_noise_std_is_z_clip_over_m():
    z, clip, m = 1.5, 0.4, 8
    plan = make_dp_plan(TREE, noise_multiplier=z, clients_per_round=m, clip_norm=clip)
    query = queries.make_query(plan.aggregation)
    n = 200_000
    result = query.finalize((np.zeros(n),), m, np.random.default_rng(4))
    assert result.metrics["dp/noise_stddev"] == pytest.approx(z * clip / m)
    assert result.mean[0].std() == pytest.approx(z * clip / m, rel=6 * math.sqrt(2 / n))


def test_updates_above_the_zeroing_norm_are_zeroed_but_counted():
    plan = make_dp_plan(TREE, clients_per_round=2, clip_norm=1.0, zeroing_norm=100.0)
    outcome = close_round(
        plan,
        initial_state(plan),
        [constant_update(150.0), constant_update(0.01)],
        np.random.default_rng(0),
    )
    assert outcome.metrics["server/aggregator/zeroed_count"] == 1.0
    assert outcome.metrics["server/aggregator/num_clients"] == 2.0
    np.testing.assert_allclose(outcome.mean_update[1], 0.005, rtol=1e-5)


@pytest.mark.parametrize(
    "plan_kwargs",
    [
        {"dp_type": TREE, "noise_multiplier": 1.2},
        {
            "dp_type": ADAPTIVE_TREE,
            "noise_multiplier": 0.5,
            "restart_frequency": 4,
            "restart_warmup": 2,
        },
    ],
)
def test_restart_from_a_checkpoint_continues_the_same_noise_process(plan_kwargs):
    plan = make_dp_plan(clients_per_round=20, **plan_kwargs)
    rng = np.random.default_rng(9)
    rounds = [random_updates(rng, 20) for _ in range(7)]
    straight = run_rounds(plan, rounds, seed=5)
    restarted = run_rounds(plan, rounds, seed=5, checkpoint_after=3)
    for a, b in zip(straight, restarted, strict=True):
        assert a.metrics == b.metrics
        for x, y in zip(a.mean_update, b.mean_update, strict=True):
            np.testing.assert_array_equal(x, y)
    # A server that lost the aggregator state would start a new tree: different noise.
    fresh = run_rounds(plan, rounds[3:], seed=5)
    assert not np.array_equal(fresh[0].mean_update[0], straight[3].mean_update[0])


def test_the_checkpoint_carries_the_tree():
    plan = make_dp_plan(TREE, noise_multiplier=1.0, clients_per_round=3)
    rng = np.random.default_rng(0)
    state = run_rounds(plan, [random_updates(rng, 3) for _ in range(3)], seed=1)[-1].new_state
    decoded = checkpoints.decode_server_checkpoint(
        checkpoints.encode_server_checkpoint(state), plan
    )
    assert sorted(decoded.aggregator_state) == sorted(state.aggregator_state)
    for key, value in state.aggregator_state.items():
        np.testing.assert_array_equal(decoded.aggregator_state[key], value)
        assert decoded.aggregator_state[key].dtype == value.dtype


def test_adaptive_tree_changes_the_clip_only_at_restarts():
    period, warmup = 4, 2
    plan = make_dp_plan(
        ADAPTIVE_TREE,
        clients_per_round=6,
        init_clip_norm=0.2,
        target_quantile=0.9,
        clipped_count_stddev=1e-12,
        restart_frequency=period,
        restart_warmup=warmup,
    )
    rng = np.random.default_rng(3)
    outcomes = run_rounds(plan, [random_updates(rng, 6) for _ in range(10)], seed=4)
    restarts = [
        k + 1
        for k, o in enumerate(outcomes)
        if o.metrics["server/aggregator/dp/tree_restarted"] == 1.0
    ]
    assert restarts == [2, 6, 10]  # after round k with k % 4 == 2
    clips = [o.metrics["server/aggregator/dp/clip_norm"] for o in outcomes]
    estimates = [o.metrics["server/aggregator/dp/clip_estimate"] for o in outcomes]
    assert clips[:2] == [0.2, 0.2]
    assert clips[2:6] == pytest.approx([estimates[1]] * 4)
    assert clips[6:10] == pytest.approx([estimates[5]] * 4)
    assert len(set(estimates)) == len(estimates)  # the estimate moves every round
    leaves = [o.metrics["server/aggregator/dp/tree_leaves"] for o in outcomes]
    assert leaves[:4] == [1.0, 0.0, 1.0, 2.0]


def test_adaptive_tree_counts_against_the_estimate_not_the_clip():
    plan = make_dp_plan(ADAPTIVE_TREE, clients_per_round=4, noise_multiplier=0.0)
    state = {
        "adaptive/clip": np.array(1.0),
        "adaptive/estimate": np.array(0.3),
        "restart/rounds": np.array(5, np.int64),
    }
    acc = RoundAccumulator(plan, state)
    assert acc.query.record_clip() == 1.0
    assert acc.query.quantile_threshold() == 0.3
    acc.add(constant_update(0.1))  # norm 0.1 * sqrt(8) = 0.28 <= 0.3
    acc.add(constant_update(0.2))
    assert acc.below_threshold() == 1
    assert acc.clipped_count == 0


def test_restart_defaults_and_validation():
    query = queries.make_query(make_dp_plan(ADAPTIVE_TREE, clients_per_round=10).aggregation)
    assert isinstance(query, tree_queries.AdaptiveTreeQuery)
    assert (query.restart_period, query.restart_warmup) == (1024, 128)
    for frequency, warmup in [(4, 4), (1, 0), (8, 9)]:
        plan = make_dp_plan(
            ADAPTIVE_TREE, clients_per_round=10, restart_frequency=frequency, restart_warmup=warmup
        )
        with pytest.raises(ValueError, match="restart"):
            RoundAccumulator(plan)


def test_a_tree_state_for_another_model_is_refused_at_finalize():
    plan = make_dp_plan(TREE, noise_multiplier=1.0, clients_per_round=2)
    tree: dict[str, Tensor] = {
        "tree/levels": np.array([0], np.int64),
        "tree/noise/0": np.zeros((1, 3), np.float32),
    }
    state = dataclasses.replace(initial_state(plan), aggregator_state=tree)
    with pytest.raises(ValueError, match="model has"):
        close_round(plan, state, [constant_update(0.1)], np.random.default_rng(0))
