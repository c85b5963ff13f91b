"""Differential-privacy primitives of DP-FedAvg: clipping, zeroing and Gaussian noise.

Follows McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR 2018,
arXiv 1710.17220) as implemented by TFF 0.87: each record is clipped to a global L2 norm the way
`tf.clip_by_global_norm` does inside `tfp.GaussianSumQuery`, records with a too large L-inf norm
are zeroed as `tff.aggregators.zeroing_factory` does, and `N(0, (z * C)^2)` noise is added to
the sum. All functions are pure; randomness comes from an injected `np.random.Generator`.
"""

import concurrent.futures
import functools
import math
import os
import secrets
from collections.abc import Sequence

import numpy as np

from fcp_server.aggregation import update_norms
from fcp_server.aggregation.state import Tensor, Tensors

# 256 bits of OS entropy: the noise must not be predictable from anything an attacker sees.
_SEED_BITS = 256
# Elements per independently seeded block of noise (1 MiB of float64) and the most threads
# drawing blocks at once.
_NOISE_BLOCK = 1 << 17
_MAX_NOISE_THREADS = 4
# Elements of a block processed at a time (256 KiB of float64, which the L2 cache holds).
_NOISE_STEP = 1 << 15


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


def _check_positive_finite(value: float, name: str) -> None:
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
    _check_positive_finite(clip, "clip")
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
    _check_positive_finite(zeroing_norm, "zeroing_norm")
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
    _check_positive_finite(clip, "clip")
    return noise_multiplier * clip


def add_gaussian_noise(tensors: Sequence[Tensor], std: float, rng: np.random.Generator) -> Tensors:
    """Adds independent N(0, std^2) noise to every element; `noised_float64` cast back.

    Returns:
        Noised arrays in their input dtypes.

    Raises:
        ValueError: As `noised_float64`.
    """
    noised = noised_float64(tensors, std, rng)
    return tuple(out.astype(t.dtype, copy=False) for out, t in zip(noised, tensors, strict=True))


def noised_float64(
    tensors: Sequence[Tensor],
    std: float,
    rng: np.random.Generator,
    *,
    divisor: float = 1.0,
) -> Tensors:
    """Returns new float64 arrays: (the tensors plus independent N(0, std^2) noise) / divisor.

    The noise is drawn in blocks of `_NOISE_BLOCK` elements, each from its own stream spawned
    from `rng` (numpy's `Generator.spawn`: independent streams derived from `rng`'s seed), and
    the blocks are drawn in parallel threads. The block size is fixed, so the noise depends only
    on `rng`, never on the number of threads. Each block is drawn, scaled, added to and divided
    `_NOISE_STEP` elements at a time, so every step after the draw reads what the cache holds;
    each element goes through the same operations in the same order as whole-array passes
    would, so the result is bit-identical to them. A float32 tensor is added to the float64
    noise as it is: the conversion is exact, so the sum is the same as converting it first.

    Args:
        tensors: Floating arrays.
        std: Noise standard deviation, >= 0.
        rng: The noise source; use `make_noise_rng()` in production.
        divisor: What the noised sums are divided by (a query's fixed denominator), > 0.

    Raises:
        ValueError: If `std` is negative or not finite, `divisor` is not positive and finite,
            or a tensor is not floating point.
    """
    if not (math.isfinite(std) and std >= 0.0):
        raise ValueError(f"Noise `std` must be a non-negative finite number, found {std}.")
    _check_positive_finite(divisor, "divisor")
    for t in tensors:
        if not np.issubdtype(t.dtype, np.floating):
            raise ValueError(f"Gaussian noise needs floating tensors, found dtype {t.dtype}.")
    # The float64 output takes the noise and then the tensor: no float64 copy of the tensor.
    noised = tuple(np.empty(t.shape, dtype=np.float64) for t in tensors)
    blocks = [
        (out_flat[start : start + _NOISE_BLOCK], flat[start : start + _NOISE_BLOCK])
        for out, t in zip(noised, tensors, strict=True)
        for out_flat, flat in [(out.reshape(-1), t.reshape(-1))]
        for start in range(0, flat.size, _NOISE_BLOCK)
    ]
    streams = rng.spawn(len(blocks))

    def draw(block: tuple[Tensor, Tensor], stream: np.random.Generator) -> None:
        out, values = block
        # Drawing a block in steps gives the same numbers as drawing it at once (the normal
        # sampler consumes its stream element by element).
        for start in range(0, out.size, _NOISE_STEP):
            step = out[start : start + _NOISE_STEP]
            stream.standard_normal(out=step)  # numpy fills it without holding the GIL
            np.multiply(step, std, out=step)
            np.add(step, values[start : start + _NOISE_STEP], out=step)
            if divisor != 1.0:
                np.divide(step, divisor, out=step)

    if len(blocks) > 1:
        list(_noise_threads().map(draw, blocks, streams))
    else:
        for block, stream in zip(blocks, streams, strict=True):
            draw(block, stream)
    return noised


@functools.cache
def _noise_threads() -> concurrent.futures.ThreadPoolExecutor:
    workers = max(1, min(os.cpu_count() or 1, _MAX_NOISE_THREADS))
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fcp-noise")


# A forked child inherits the pool object but not its threads: it must make its own.
os.register_at_fork(after_in_child=_noise_threads.cache_clear)


def make_noise_rng() -> np.random.Generator:
    """Returns a generator seeded from OS entropy, never from data or a fixed seed.

    A predictable noise seed would let anyone who knows it subtract the noise and void the
    DP guarantee, so production aggregation must take its generator from here.
    """
    seed = np.random.SeedSequence(entropy=secrets.randbits(_SEED_BITS))
    return np.random.Generator(np.random.PCG64(seed))
