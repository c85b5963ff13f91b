"""Private quantile estimation of update norms: the math of adaptive clipping.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping"
(NeurIPS 2021, arXiv 1905.03871), exactly as TF-Privacy 0.9.0's `QuantileEstimatorQuery` with
`geometric_update=True` runs it inside TFF 0.87's `DifferentiallyPrivateFactory.gaussian_adaptive`
and `tree_adaptive`:

* each record contributes `1[norm <= estimate] - 0.5` (the 0.5 shift keeps the contribution's
  sensitivity at 0.5), the sum gets Gaussian noise of std `clipped_count_stddev`, is divided by
  the *expected* number of records, shifted back by +0.5 and clamped to [0, 1];
* the estimate moves geometrically: `C <- C * exp(-lr * (fraction - target_quantile))`;
* the user's `noise_multiplier` is the effective total: the value noise multiplier is raised to
  `(z^-2 - (2 * clipped_count_stddev)^-2)^-1/2` so that value and count noise together cost
  what z alone would (TFF `adaptive_clip_noise_params`).

All functions are pure.
"""

import logging
import math

_LOG = logging.getLogger(__name__)

# Defaults of ODP's task config (0 = unset) and TFF's factories.
DEFAULT_INIT_CLIP_NORM = 0.1
DEFAULT_TARGET_QUANTILE = 0.5
DEFAULT_CLIP_LEARNING_RATE = 0.2
# clipped_count_stddev defaults to clients_per_round / 20 (Andrew et al.'s recommendation).
DEFAULT_COUNT_STDDEV_FRACTION = 0.05


def default_clipped_count_stddev(clients_per_round: float) -> float:
    """Returns TFF's default clipped-count noise std, `0.05 * clients_per_round`."""
    return DEFAULT_COUNT_STDDEV_FRACTION * clients_per_round


def value_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """Returns the multiplier of the value noise for an effective total `noise_multiplier`.

    Args:
        noise_multiplier: The effective total z, >= 0 (0 means no noise at all).
        clipped_count_stddev: Std of the noise on the below-estimate count, >= 0.

    Raises:
        ValueError: If z > 0 and z >= 2 * clipped_count_stddev (TFF's message and rule: the
            count noise alone would already spend the whole budget).
    """
    if noise_multiplier < 0.0 or clipped_count_stddev < 0.0:
        raise ValueError("noise_multiplier and clipped_count_stddev must be non-negative.")
    if noise_multiplier == 0.0:
        return 0.0
    if noise_multiplier >= 2.0 * clipped_count_stddev:
        raise ValueError(
            f"clipped_count_stddev = {clipped_count_stddev} (defaults to 0.05 * "
            "clients_per_round) is too low to achieve the desired effective noise_multiplier "
            f"({noise_multiplier}): adaptive clipping needs noise_multiplier < 2 * "
            "clipped_count_stddev. Increase clipped_count_stddev (or clients_per_round) or "
            "decrease noise_multiplier."
        )
    value_z = float((noise_multiplier**-2 - (2.0 * clipped_count_stddev) ** -2) ** -0.5)
    if value_z / noise_multiplier >= 2.0:
        _LOG.warning(
            "Adaptive clipping adds %.2fx the value noise to reach noise_multiplier %s; "
            "consider a larger clipped_count_stddev or more clients per round.",
            value_z / noise_multiplier,
            noise_multiplier,
        )
    return value_z


def below_estimate_fraction(noised_shifted_sum: float, expected_num_records: float) -> float:
    """Returns the private fraction of records at or below the estimate, clamped to [0, 1].

    Args:
        noised_shifted_sum: `sum(1[norm <= estimate] - 0.5)` over the records plus the count
            noise (for tree aggregation: plus the tree's residual noise).
        expected_num_records: The fixed denominator (clients_per_round), > 0; TF-Privacy
            divides by it, not by the records received.
    """
    fraction = noised_shifted_sum / expected_num_records + 0.5
    return min(1.0, max(0.0, fraction))


def shifted_count(below_threshold: int, num_records: int) -> float:
    """Returns `sum(indicator - 0.5)` for `below_threshold` of `num_records` records."""
    return below_threshold - 0.5 * num_records


def next_estimate(
    estimate: float, fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """Returns the geometric quantile update `estimate * exp(-lr * (fraction - target))`.

    Clamped at 0 like TF-Privacy's `tf.maximum(new_l2_norm_clip, 0.0)`.
    """
    return max(0.0, estimate * math.exp(-learning_rate * (fraction - target_quantile)))
