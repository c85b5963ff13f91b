"""The numpy adaptive and tree aggregators against TF-Privacy 0.9.0's DPQueries (TFF's own)."""

import math
from typing import Any

import numpy as np
import pytest

from fcp_server.aggregation import tree_noise
from fcp_server.aggregation.state import ClientUpdate
from tests.unit.aggregation.dp_rounds import make_dp_plan, random_updates, run_rounds
from tests.unit.aggregation.plan_builders import TRAINABLE_SHAPES, DpType

tf = pytest.importorskip("tensorflow")
tfp = pytest.importorskip("tensorflow_privacy")

pytestmark = pytest.mark.tf

M = 10  # clients_per_round
ROUNDS = 8


def _tf_round(query: Any, global_state: Any, updates: list[ClientUpdate]) -> tuple[list[Any], Any]:
    """One TFF round of a DPQuery: clip and sum every record, then get_noised_result."""
    params = query.derive_sample_params(global_state)
    template = [tf.zeros(s, tf.float32) for s in TRAINABLE_SHAPES]
    sample_state = query.initial_sample_state(template)
    for update in updates:
        record = [tf.constant(t) for t in update.trainable]
        sample_state = query.accumulate_record(params, sample_state, record)
    result, new_state, _ = query.get_noised_result(sample_state, global_state)
    return [r.numpy() for r in result], new_state


def _rounds() -> list[list[ClientUpdate]]:
    rng = np.random.default_rng(2024)
    # Fewer records than expected in some rounds: TF-Privacy still divides by M.
    return [random_updates(rng, M - (k % 3), scale=0.7) for k in range(ROUNDS)]


def test_adaptive_gaussian_clip_path_and_outputs_match_tf_privacy():
    rounds = _rounds()
    inner = tfp.QuantileAdaptiveClipSumQuery(
        initial_l2_norm_clip=0.5,
        noise_multiplier=0.0,
        target_unclipped_quantile=0.7,
        learning_rate=0.3,
        clipped_count_stddev=0.0,
        expected_num_records=float(M),
        geometric_update=True,
    )
    query = tfp.NormalizedQuery(inner, denominator=float(M))
    state = query.initial_global_state()
    tf_clips, tf_means = [], []
    for updates in rounds:
        tf_clips.append(float(state.numerator_state.sum_state.l2_norm_clip))
        mean, state = _tf_round(query, state, updates)
        tf_means.append(mean)
    # z = 0 and a vanishing count noise: our process is deterministic too.
    plan = make_dp_plan(
        DpType.ADAPTIVE_GAUSSIAN,
        clients_per_round=M,
        init_clip_norm=0.5,
        target_quantile=0.7,
        clip_learning_rate=0.3,
        clipped_count_stddev=1e-12,
    )
    outcomes = run_rounds(plan, rounds, seed=0)
    clips = [o.metrics["server/aggregator/dp/clip_norm"] for o in outcomes]
    np.testing.assert_allclose(clips, tf_clips, rtol=1e-5)
    assert len(set(np.round(clips, 6))) > ROUNDS // 2  # the clip really moved
    for outcome, tf_mean in zip(outcomes, tf_means, strict=True):
        for ours, theirs in zip(outcome.mean_update, tf_mean, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_adaptive_tree_clip_path_with_restarts_matches_tf_privacy():
    rounds = _rounds()
    specs = [tf.TensorSpec(s, tf.float32) for s in TRAINABLE_SHAPES]
    inner = tfp.QAdaClipTreeResSumQuery(
        0.5, 0.0, specs, 0.7, 0.3, 0.0, float(M), geometric_update=True, noise_seed=1
    )
    indicator = tfp.restart_query.PeriodicRoundRestartIndicator(period=3, warmup=1)
    query = tfp.NormalizedQuery(tfp.RestartQuery(inner, indicator), denominator=float(M))
    state = query.initial_global_state()
    tf_clips, tf_estimates, tf_means = [], [], []
    for updates in rounds:
        mean, state = _tf_round(query, state, updates)
        inner_state = state.numerator_state.inner_query_state
        tf_clips.append(float(inner_state.sum_state.clip_value))
        tf_estimates.append(float(inner_state.quantile_estimator_state.current_estimate))
        tf_means.append(mean)
    plan = make_dp_plan(
        DpType.ADAPTIVE_TREE,
        clients_per_round=M,
        init_clip_norm=0.5,
        target_quantile=0.7,
        clip_learning_rate=0.3,
        clipped_count_stddev=1e-12,
        restart_frequency=3,
        restart_warmup=1,
    )
    outcomes = run_rounds(plan, rounds, seed=0)
    next_clips = [o.metrics["server/aggregator/dp/next_clip_norm"] for o in outcomes]
    estimates = [o.metrics["server/aggregator/dp/clip_estimate"] for o in outcomes]
    np.testing.assert_allclose(next_clips, tf_clips, rtol=1e-5)
    np.testing.assert_allclose(estimates, tf_estimates, rtol=1e-5)
    assert len(set(np.round(next_clips, 6))) >= 3  # restarts adopted new clips
    for outcome, tf_mean in zip(outcomes, tf_means, strict=True):
        for ours, theirs in zip(outcome.mean_update, tf_mean, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_tree_residual_noise_variance_matches_tf_privacy():
    std, rounds, size, repeats = 0.8, 12, 20_000, 4
    tf_noise = np.zeros((repeats, rounds))
    ours = np.zeros((repeats, rounds))
    rng = np.random.default_rng(77)
    for r in range(repeats):
        specs = [tf.TensorSpec([size], tf.float32)]
        query = tfp.TreeResidualSumQuery.build_l2_gaussian_query(
            clip_norm=1.0,
            noise_multiplier=std,
            record_specs=specs,
            noise_seed=100 + r,
            use_efficient=True,
        )
        state = query.initial_global_state()
        tree = tree_noise.TreeNoise()
        zero = np.zeros(size, np.float32)
        for t in range(rounds):
            (noise,), state, _ = query.get_noised_result([tf.constant(zero)], state)
            tf_noise[r, t] = float(np.mean(noise.numpy().astype(np.float64) ** 2))
            before = tree_noise.cumulative_noise(tree, [(size,)])[0]
            tree = tree_noise.add_leaf(tree, [(size,)], std, rng)
            after = tree_noise.cumulative_noise(tree, [(size,)])[0]
            ours[r, t] = float(np.mean((after - before) ** 2))
    # Two independent variance estimates over repeats * size normals each.
    tolerance = 6 * math.sqrt(2 / (repeats * size)) * math.sqrt(2)
    np.testing.assert_allclose(ours.mean(axis=0), tf_noise.mean(axis=0), rtol=tolerance)
    # Not all rounds have the same variance (e.g. round 3 has 1.38 std^2).
    assert tf_noise.mean(axis=0)[3] > 1.2 * std**2
