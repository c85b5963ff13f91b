import math

import numpy as np
import pytest

from fcp_server.aggregation import adaptive_clipping, queries
from fcp_server.aggregation import quantile_estimation as qe
from fcp_server.aggregation.accumulator import RoundAccumulator
from tests.unit.aggregation.dp_rounds import (
    close_round,
    initial_state,
    make_dp_plan,
    random_updates,
    run_rounds,
)
from tests.unit.aggregation.plan_builders import TRAINABLE_SHAPES, DpType, make_update

ADAPTIVE = DpType.ADAPTIVE_GAUSSIAN
# Count noise this small is invisible at the tolerances below, so the clip path is exact.
TINY_STDDEV = 1e-12


def _update_with_norm(norm: float):
    size = sum(math.prod(s) for s in TRAINABLE_SHAPES)
    value = norm / math.sqrt(size)
    return make_update(
        tuple(np.full(s, value, np.float32) for s in TRAINABLE_SHAPES), with_metrics=False
    )


@pytest.mark.parametrize(
    ("z", "clients", "expected"),
    # Values from tff-dp-flex-facts.md 2.2 (TFF adaptive_clip_noise_params).
    [(1.2, 120, 1.206), (1.0, 50, 1.021), (0.0, 10, 0.0)],
)
def test_value_noise_multiplier_matches_tff(z, clients, expected):
    stddev = qe.default_clipped_count_stddev(clients)
    assert qe.value_noise_multiplier(z, stddev) == pytest.approx(expected, abs=1e-3)


def test_noise_rule_z_below_twice_the_count_stddev():
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        qe.value_noise_multiplier(0.5, 0.25)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        qe.value_noise_multiplier(0.5, 0.0)


def test_fraction_uses_the_expected_count_and_is_clamped():
    # 3 of 5 below with 10 expected: (3 - 2.5) / 10 + 0.5, not 3 / 5.
    assert qe.below_estimate_fraction(qe.shifted_count(3, 5), 10) == pytest.approx(0.55)
    assert qe.below_estimate_fraction(100.0, 10) == 1.0
    assert qe.below_estimate_fraction(-100.0, 10) == 0.0


def test_geometric_update():
    assert qe.next_estimate(2.0, 0.9, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.08))
    assert qe.next_estimate(2.0, 0.5, 0.5, 0.2) == 2.0


def test_unset_plan_fields_get_the_task_builder_defaults():
    plan = make_dp_plan(
        ADAPTIVE,
        clients_per_round=40,
        init_clip_norm=0.0,
        target_quantile=0.0,
        clip_learning_rate=0.0,
        noise_multiplier=1.0,
    )
    params = adaptive_clipping.AdaptiveParams.from_spec(plan.aggregation)
    assert params.initial_clip == 0.1
    assert params.target_quantile == 0.5
    assert params.learning_rate == 0.2
    assert params.clipped_count_stddev == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("init_clip_norm", -1.0, "init_clip_norm"),
        ("target_unclipped_quantile", 1.5, "target_unclipped_quantile"),
        ("clip_learning_rate", -0.1, "clip_learning_rate"),
        ("noise_multiplier", math.nan, "noise_multiplier"),
    ],
)
def test_invalid_adaptive_plans_are_refused(field, value, match):
    plan = make_dp_plan(ADAPTIVE, clients_per_round=100, noise_multiplier=0.5)
    setattr(plan.aggregation, field, value)
    with pytest.raises(ValueError, match=match):
        RoundAccumulator(plan)


def test_one_round_counts_unclipped_records_and_moves_the_clip():
    plan = make_dp_plan(
        ADAPTIVE,
        clients_per_round=4,
        init_clip_norm=1.0,
        target_quantile=0.25,
        clipped_count_stddev=TINY_STDDEV,
    )
    state = initial_state(plan)
    updates = [_update_with_norm(n) for n in (0.5, 1.0, 2.0, 3.0)]
    outcome = close_round(plan, state, updates, np.random.default_rng(0))
    # Norm 1.0 <= clip 1.0 counts as unclipped (TF-Privacy compares with <=).
    fraction = 0.5
    new_clip = math.exp(-0.2 * (fraction - 0.25))
    m = outcome.metrics
    assert m["server/aggregator/dp/clip_norm"] == 1.0
    assert m["server/aggregator/dp/unclipped_quantile_estimate"] == pytest.approx(fraction)
    assert m["server/aggregator/dp/next_clip_norm"] == pytest.approx(new_clip)
    assert m["server/aggregator/clipped_count"] == 2.0
    assert float(outcome.new_state.aggregator_state["adaptive/clip"]) == pytest.approx(new_clip)
    # Mean of the records clipped to 1: (0.5 + 1 + 1 + 1) / 4 along the same direction.
    expected = 3.5 / 4 / math.sqrt(sum(math.prod(s) for s in TRAINABLE_SHAPES))
    np.testing.assert_allclose(outcome.mean_update[1], expected, rtol=1e-6)


def test_the_next_round_uses_the_carried_clip():
    plan = make_dp_plan(
        ADAPTIVE,
        clients_per_round=4,
        init_clip_norm=1.0,
        target_quantile=1.0,
        clipped_count_stddev=TINY_STDDEV,
    )
    rng = np.random.default_rng(1)
    rounds = [random_updates(rng, 4) for _ in range(5)]
    outcomes = run_rounds(plan, rounds, seed=3)
    used = [o.metrics["server/aggregator/dp/clip_norm"] for o in outcomes]
    chosen = [o.metrics["server/aggregator/dp/next_clip_norm"] for o in outcomes]
    assert used[1:] == pytest.approx(chosen[:-1])
    # Target quantile 1: the clip grows after a round with a clipped record and stays (up to
    # the 1e-12 count noise, whose sign is random) after a round without one.
    clipped = [o.metrics["server/aggregator/clipped_count"] for o in outcomes]
    assert any(clipped) and not all(clipped)
    for before, after, n in zip(used, used[1:], clipped, strict=False):
        if n:
            assert after > before * 1.01
        else:
            assert after == pytest.approx(before, rel=1e-9)


def test_value_noise_is_value_z_times_the_current_clip_over_m():
    z, m, clip = 0.5, 100, 0.8
    plan = make_dp_plan(ADAPTIVE, noise_multiplier=z, clients_per_round=m, init_clip_norm=clip)
    query = queries.make_query(plan.aggregation)
    value_z = qe.value_noise_multiplier(z, 0.05 * m)
    total = (np.zeros(200_000),)
    result = query.finalize(total, m, np.random.default_rng(5), below_threshold=m // 2)
    std = value_z * clip / m
    assert result.metrics["dp/noise_stddev"] == pytest.approx(std)
    assert result.metrics["dp/noise_multiplier"] == pytest.approx(value_z)
    assert result.mean[0].std() == pytest.approx(std, rel=6 * math.sqrt(2 / 200_000))


def test_finalize_needs_a_valid_below_count():
    query = queries.make_query(make_dp_plan(ADAPTIVE, clients_per_round=4).aggregation)
    with pytest.raises(ValueError, match="below the threshold"):
        query.finalize((np.zeros(2),), 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="below_threshold"):
        query.finalize((np.zeros(2),), 4, np.random.default_rng(0), below_threshold=5)


def test_a_corrupt_carried_clip_is_refused():
    plan = make_dp_plan(ADAPTIVE, clients_per_round=4)
    for bad in (np.array(-1.0), np.array([1.0]), np.array(np.inf), np.array(1, np.int64)):
        with pytest.raises(ValueError, match="adaptive/clip"):
            RoundAccumulator(plan, {"adaptive/clip": bad})


def test_restart_from_a_checkpoint_continues_the_same_clip_path():
    plan = make_dp_plan(ADAPTIVE, noise_multiplier=0.5, clients_per_round=20)
    rng = np.random.default_rng(7)
    rounds = [random_updates(rng, 20) for _ in range(6)]
    straight = run_rounds(plan, rounds, seed=11)
    restarted = run_rounds(plan, rounds, seed=11, checkpoint_after=3)
    for a, b in zip(straight, restarted, strict=True):
        assert a.metrics == b.metrics
        for x, y in zip(a.new_state.weights.trainable, b.new_state.weights.trainable, strict=True):
            np.testing.assert_array_equal(x, y)
