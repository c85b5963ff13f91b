"""TFF's per-record DP steps written plainly: the reference the server's fused kernels meet.

`RoundAccumulator` clips, zeroes and sums in one or two memory passes per update; these
functions do each step on its own the way TFF 0.87 does (`tf.clip_by_global_norm` inside
`tfp.GaussianSumQuery`, `tff.aggregators.zeroing_factory`, `zero_all_if_any_non_finite`), so
tests can build the expected aggregate from them.
"""

import math
from collections.abc import Sequence

import numpy as np

from fcp_server.aggregation import update_norms
from fcp_server.aggregation.dp import check_positive_finite, global_linf_norm
from fcp_server.aggregation.state import Tensor, Tensors


def global_l2_norm(tensors: Sequence[Tensor]) -> float:
    """Returns the L2 norm of all elements of all tensors taken together (float64).

    Args:
        tensors: Arrays of any shape.
    """
    return math.sqrt(update_norms.exact_sum_of_squares(tensors))


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
