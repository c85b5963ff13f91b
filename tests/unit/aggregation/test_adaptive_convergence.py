"""Adaptive clipping converges to the target quantile of the update norms (Andrew et al. 2021).

Every round, 50 updates arrive whose L2 norms are drawn from a fixed log-normal distribution
(median 1, log-std 0.5), so the target quantile q of the norms is known in closed form:
exp(0.5 * Phi^-1(q)). The rounds run through the server's round-close math (`RoundAccumulator`
+ `finalize_round`), starting from a clip 10x too small or 10x too large. After a burn-in the
clip must sit at the target quantile: averaged over the last 100 rounds the share of norms
below it is within 0.02 of q with the count noise off, and within 0.04 with TFF's default
count noise (clients_per_round / 20 = 2.5, i.e. +-0.05 on each round's observed fraction).
"""

import math
import statistics

import numpy as np
import pytest

from tests.unit.aggregation.dp_rounds import make_dp_plan, run_rounds
from tests.unit.aggregation.plan_builders import TRAINABLE_SHAPES, DpType, make_update

CLIENTS = 50
ROUNDS = 260
LAST = 100
TARGET = 0.7
LOG_STD = 0.5
NORMS = statistics.NormalDist(mu=0.0, sigma=LOG_STD)  # distribution of log(norm)
TARGET_NORM = math.exp(NORMS.inv_cdf(TARGET))  # 1.30
TINY_STDDEV = 1e-12  # "no count noise": 0 would mean the default


def _updates(rng: np.random.Generator):
    rounds = []
    for _ in range(ROUNDS):
        updates = []
        for _ in range(CLIENTS):
            direction = [rng.normal(size=s) for s in TRAINABLE_SHAPES]
            length = math.sqrt(sum(float(np.sum(d**2)) for d in direction))
            norm = math.exp(rng.normal(scale=LOG_STD))
            trainable = tuple((d * norm / length).astype(np.float32) for d in direction)
            updates.append(make_update(trainable, with_metrics=False))
        rounds.append(updates)
    return rounds


def _share_below(clip: float) -> float:
    """The fraction of the norm distribution at or below `clip`."""
    return NORMS.cdf(math.log(clip))


@pytest.mark.parametrize("initial_clip", [0.13, 13.0])
@pytest.mark.parametrize(
    ("dp_type", "count_stddev", "tolerance"),
    [
        (DpType.ADAPTIVE_GAUSSIAN, TINY_STDDEV, 0.02),
        (DpType.ADAPTIVE_GAUSSIAN, 0.0, 0.04),  # 0: TFF's default, clients_per_round / 20
        (DpType.ADAPTIVE_TREE, TINY_STDDEV, 0.02),
        (DpType.ADAPTIVE_TREE, 0.0, 0.04),
    ],
    ids=["gaussian-no-count-noise", "gaussian-default", "tree-no-count-noise", "tree-default"],
)
def test_clip_converges_to_the_target_quantile_of_the_norms(
    dp_type, count_stddev, tolerance, initial_clip
):
    # Arrange: z = 1 keeps TFF's z < 2 x count stddev rule with the default stddev.
    z = 1.0 if count_stddev == 0.0 else 0.0
    plan = make_dp_plan(
        dp_type,
        noise_multiplier=z,
        clients_per_round=CLIENTS,
        init_clip_norm=initial_clip,
        target_quantile=TARGET,
        clipped_count_stddev=count_stddev,
    )

    # Act.
    outcomes = run_rounds(plan, _updates(np.random.default_rng(17)), seed=3)

    # Assert: the quantile estimate (the clip itself for ADAPTIVE_GAUSSIAN) converged.
    key = "next_clip_norm" if dp_type == DpType.ADAPTIVE_GAUSSIAN else "clip_estimate"
    estimates = [o.metrics[f"server/aggregator/dp/{key}"] for o in outcomes]
    mean_share = float(np.mean([_share_below(c) for c in estimates[-LAST:]]))
    assert mean_share == pytest.approx(TARGET, abs=tolerance)
    assert all(abs(math.log(c / TARGET_NORM)) < 0.25 for c in estimates[-LAST:])
    if dp_type == DpType.ADAPTIVE_TREE:
        # The tree's clip adopts the estimate at the first restart (after round 128).
        clips = [o.metrics["server/aggregator/dp/clip_norm"] for o in outcomes]
        assert clips[127] == initial_clip
        assert clips[128] == pytest.approx(estimates[127])
        assert abs(math.log(clips[-1] / TARGET_NORM)) < 0.25
