"""Differential-privacy primitives of DP-FedAvg: clipping, zeroing and the noise's scale.

Follows McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR 2018,
arXiv 1710.17220) as implemented by TFF 0.87: each record is clipped to a global L2 norm the way
`tf.clip_by_global_norm` does inside `tfp.GaussianSumQuery`, records with a too large L-inf norm
are zeroed as `tff.aggregators.zeroing_factory` does, and `N(0, (z * C)^2)` noise is added to
the sum (drawn in `gaussian_noise`). All functions are pure.
"""

import math
from collections.abc import Sequence

import numpy as np

from fcp_server.aggregation import update_norms
from fcp_server.aggregation.state import Tensor, Tensors


def global_l2_norm(tensors: Sequence[Tensor]) -> float:
    """Returns the L2 norm of all elements of all tensors taken together (float64).

    Args:
        tensors: Arrays of any shape.
    """
    return math.sqrt(update_norms.exact_sum_of_squares(tensors))


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


def clip_l2(tensors: Sequence[Tensor], clip: float) -> tuple[Tensors, float, bool]:
    """Scales the tensors so their global L2 norm is at most `clip`.

    Same math as `tf.clip_by_global_norm`: every tensor is multiplied by
    `clip / max(global_norm, clip)`, so a record within the bound is returned unchanged.

    Args:
        tensors: Finite arrays (zero non-finite records before clipping).
        clip: The L2 bound C, > 0.

    Returns:
        (clipped tensors in their input dtypes, the global norm before clipping, whether the
        record was scaled down).

    Raises:
        ValueError: If `clip` is not positive and finite or the tensors are not finite.
    """
    check_positive_finite(clip, "clip")
    norm = global_l2_norm(tensors)
    if not math.isfinite(norm):
        raise ValueError("clip_l2 needs finite tensors; zero non-finite records first.")
    if norm <= clip:
        return tuple(np.array(t, copy=True) for t in tensors), norm, False
    scale = clip / norm
    clipped = tuple((t.astype(np.float64) * scale).astype(t.dtype) for t in tensors)
    return clipped, norm, True


def zero_if_linf_exceeds(tensors: Sequence[Tensor], zeroing_norm: float) -> tuple[Tensors, bool]:
    """Replaces the record by zeros when its L-inf norm exceeds `zeroing_norm`.

    As `tff.aggregators.zeroing_factory(zeroing_norm, inner, norm_order=inf)`: a zeroed record
    still counts as a record (it contributes zeros), only its values are dropped.

    Args:
        tensors: Arrays of any shape.
        zeroing_norm: The L-inf threshold, > 0.

    Returns:
        (the record or zeros of the same shapes/dtypes, whether it was zeroed).

    Raises:
        ValueError: If `zeroing_norm` is not positive and finite.
    """
    check_positive_finite(zeroing_norm, "zeroing_norm")
    if global_linf_norm(tensors) > zeroing_norm:
        return tuple(np.zeros_like(t) for t in tensors), True
    return tuple(np.array(t, copy=True) for t in tensors), False


def zero_non_finite(tensors: Sequence[Tensor]) -> tuple[Tensors, bool]:
    """Zeroes a whole record if any element is NaN/Inf (TFF `zero_all_if_any_non_finite`).

    Args:
        tensors: Arrays of any shape.

    Returns:
        (the record or zeros of the same shapes/dtypes, whether it was non-finite).
    """
    finite = all(bool(np.all(np.isfinite(t))) for t in tensors)
    if finite:
        return tuple(np.array(t, copy=True) for t in tensors), False
    return tuple(np.zeros_like(t) for t in tensors), True


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
