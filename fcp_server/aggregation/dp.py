"""Small pure pieces of DP-FedAvg's record bounding and noise scale.

Follows McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR 2018,
arXiv 1710.17220) as implemented by TFF 0.87: records with a too large L-inf norm are zeroed as
`tff.aggregators.zeroing_factory` does (`global_linf_norm`; the accumulator zeroes and clips),
and `N(0, (z * C)^2)` noise is added to the clipped sum (`noise_stddev`; drawn in
`gaussian_noise`).
"""

import math
from collections.abc import Sequence

import numpy as np

from fcp_server.aggregation.state import Tensor


def global_linf_norm(tensors: Sequence[Tensor]) -> float:
    """Returns the largest absolute element over all tensors (0 for no elements).

    Args:
        tensors: Arrays of any shape.
    """
    return max((float(np.max(np.abs(t))) for t in tensors if t.size), default=0.0)


def check_positive_finite(value: float, name: str) -> None:
    """Raises ValueError naming `name` unless `value` is finite and > 0."""
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"`{name}` must be a positive finite number, found {value}.")


def noise_stddev(noise_multiplier: float, clip: float) -> float:
    """Returns the standard deviation z * C of the Gaussian noise added to the clipped sum.

    The noise on the averaged update is this value divided by the fixed denominator
    (TFF's `clients_per_round`).

    Args:
        noise_multiplier: z, >= 0.
        clip: C, > 0.

    Raises:
        ValueError: If an argument is out of range.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0.0):
        raise ValueError(
            f"`noise_multiplier` must be a non-negative finite number, found {noise_multiplier}."
        )
    check_positive_finite(clip, "clip")
    return noise_multiplier * clip
