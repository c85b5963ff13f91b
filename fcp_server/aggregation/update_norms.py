"""Per-update L2 norms and clipped running sums at close to memory speed (the aggregation kernel).

Server-side clipping (McMahan et al. 2018, arXiv 1710.17220) needs every update's global L2
norm and then adds `min(1, C / norm) * update` to the round's sum. TFF does both in the
tensors' dtype (`tf.clip_by_global_norm` and the float32 sum of `tff.federated_sum`); so do we,
with two choices made for speed and for the adversary:

- The squared norm is summed by BLAS `sdot` over chunks of `_DOT_CHUNK` elements, the chunks'
  results added in float64. Short chunks bound the float32 rounding: constant-valued updates,
  the worst case for a dot product (every rounding goes one way), stay within about 3e-6 of the
  exact norm, against 3e-4 for one dot product over 1.66M elements. A NaN/Inf element makes the
  sum non-finite, so the sum doubles as the finiteness test of an upload; squares of finite
  values above ~1.8e19 also overflow float32, and only then is the exact float64 sum taken.
- The add, scaled or not, is BLAS `axpy` (y += a * x in one pass, with the float32 or float64
  sum): numpy has no fused multiply-add, and its multiply-then-add reads the update twice.
"""

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from fcp_server.aggregation.state import Tensor, all_finite

# 16 Ki float32 elements per dot product: the rounding bound above, at ~100 calls per 1.66M.
_DOT_CHUNK = 1 << 14
# 32 Ki elements (128 KiB of float32) per scaled add when there is no BLAS routine for the
# dtypes (a float16 update): the scratch stays in the L2 cache.
_ADD_CHUNK = 1 << 15


def exact_sum_of_squares(tensors: Sequence[Tensor]) -> float:
    """Returns the float64 sum of squares of all elements (NaN/Inf propagate), chunk by chunk."""
    total = 0.0
    for t in tensors:
        flat = t.reshape(-1)
        for start in range(0, flat.size, _DOT_CHUNK):
            chunk = flat[start : start + _DOT_CHUNK].astype(np.float64)
            total += float(np.dot(chunk, chunk))
    return total


def sum_of_squares(tensors: Sequence[Tensor]) -> float:
    """Returns the sum of squares of all elements, NaN when any element is NaN or infinite.

    float32 tensors take the chunked BLAS path described in the module docstring; other
    dtypes (and float32 values whose squares overflow float32) are summed exactly in float64.
    """
    total = 0.0
    others = []
    for t in tensors:
        if t.dtype != np.float32:
            others.append(t)
            continue
        total += _chunked_dots(t.reshape(-1))
    total += exact_sum_of_squares(others)
    if math.isfinite(total):
        return total
    if not all_finite(tuple(tensors)):
        return math.nan
    # Finite but huge float32 values (squares above float32's range): exact float64 sum.
    return exact_sum_of_squares(tensors)


def _chunked_dots(flat: Tensor) -> float:
    """Float32 dot products of `_DOT_CHUNK`-element chunks with themselves, added in float64."""
    whole = flat.size - flat.size % _DOT_CHUNK
    total = 0.0
    if whole:
        rows = flat[:whole].reshape(-1, _DOT_CHUNK)
        # A stack of (1 x n) @ (n x 1) products: numpy runs BLAS sdot on every row in one call
        # (the same arithmetic as one np.dot per chunk, without a Python loop over chunks).
        dots = np.matmul(rows[:, np.newaxis, :], rows[:, :, np.newaxis])
        total = float(dots.sum(dtype=np.float64))
    tail = flat[whole:]
    return total + float(np.dot(tail, tail))


def sum_dtype(dtype: np.dtype[np.generic]) -> np.dtype[np.generic]:
    """The running sum's dtype for a tensor dtype: float32 (as TFF) or wider when the tensor is."""
    return np.result_type(dtype, np.float32)


def zeroed_sum(shape: int | tuple[int, ...], dtype: np.dtype[np.generic]) -> Tensor:
    """A zero-filled running sum whose memory is touched here, in one sequential pass.

    `np.zeros` maps untouched pages that fault in on first write, which then happens inside
    the first multithreaded BLAS add; for a 40 MB sum that measured twice as slow as writing
    the zeros first.
    """
    out = np.empty(shape, dtype=dtype)
    out.fill(0)
    return out


@functools.cache
def _axpy(dtype: np.dtype[np.generic]) -> Callable[..., Tensor] | None:
    """BLAS axpy for float32/float64 sums (scipy, already needed by dp_accounting)."""
    from scipy.linalg import blas  # imported here: only the round close pays for it

    return {np.dtype(np.float32): blas.saxpy, np.dtype(np.float64): blas.daxpy}.get(dtype)


def add_scaled(sums: Sequence[Tensor], tensors: Sequence[Tensor], scale: float | None) -> None:
    """Adds `tensors` (times `scale` when given) to `sums` in place, in the sums' dtypes.

    Args:
        sums: Running sums, one contiguous array per tensor, of `sum_dtype` of the tensors.
        tensors: The update, same shapes.
        scale: The clip factor, or None to add unscaled.

    Raises:
        ValueError: If a sum is not a contiguous array.
    """
    for total, t in zip(sums, tensors, strict=True):
        if not total.flags.c_contiguous:
            raise ValueError("Running sums must be contiguous arrays.")
        flat_total, flat = total.reshape(-1), t.reshape(-1)
        axpy = _axpy(total.dtype) if t.dtype == total.dtype else None
        if axpy is not None:
            out = axpy(flat, flat_total, a=1.0 if scale is None else scale)
            # f2py would hand back a copy for an array it cannot update in place.
            if not np.shares_memory(out, flat_total):
                raise RuntimeError("BLAS axpy did not update the running sum in place.")
        elif scale is None:
            np.add(flat_total, flat, out=flat_total)
        else:
            _multiply_add(flat_total, flat, total.dtype.type(scale))


def _multiply_add(flat_total: Tensor, flat: Tensor, factor: np.generic) -> None:
    scratch = np.empty(min(flat.size, _ADD_CHUNK), dtype=flat_total.dtype)
    for start in range(0, flat.size, _ADD_CHUNK):
        chunk = flat[start : start + _ADD_CHUNK]
        scaled = scratch[: chunk.size]
        np.multiply(chunk, factor, out=scaled, dtype=scaled.dtype)
        segment = flat_total[start : start + _ADD_CHUNK]
        np.add(segment, scaled, out=segment)
