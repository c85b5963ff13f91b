"""The Gaussian noise of DP-FedAvg: N(0, std^2) per element of the clipped sum.

The noise `tfp.GaussianSumQuery` adds in TFF's `gaussian_fixed` and `gaussian_adaptive`
(McMahan et al. 2018, arXiv 1710.17220), drawn on the server from a generator seeded with OS
entropy. It is drawn in fixed-size blocks, each from its own stream spawned from the round's
generator, so the values depend only on the generator, never on the thread count. The noise
does not depend on the updates: `prefetch_normals` starts drawing it while they are still being
summed, and `noised` gives the same result, bit for bit, whether or not it was started early.
"""

import concurrent.futures
import functools
import math
import os
import secrets
from collections.abc import Sequence

import numpy as np

from fcp_server.aggregation.dp import check_positive_finite
from fcp_server.aggregation.state import Tensor, Tensors

DType = np.dtype[np.generic]

# 256 bits of OS entropy: the noise must not be predictable from anything an attacker sees.
_SEED_BITS = 256
# Elements per independently seeded block of noise (1 MiB of float64) and the most threads
# drawing blocks at once.
_NOISE_BLOCK = 1 << 17
_MAX_NOISE_THREADS = 4
# Elements of a block processed at a time (256 KiB of float64, which the L2 cache holds).
_NOISE_STEP = 1 << 15


class PrefetchedNormals:
    """Standard normal draws for `noised`, being drawn in the background; used once.

    Built by `prefetch_normals`. Holds float64 arrays shaped like the tensors to be noised and
    the dtypes `noised` stores its results in.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        arrays: Tensors,
        dtypes: tuple[DType, ...],
        pending: list[concurrent.futures.Future[None]],
    ) -> None:
        """Holds the arrays being filled and the draws still running."""
        self._rng = rng
        self._arrays: Tensors | None = arrays
        self._dtypes = dtypes
        self._pending = pending

    def take(
        self, shapes: Sequence[tuple[int, ...]], rng: np.random.Generator
    ) -> tuple[Tensors, tuple[DType, ...]]:
        """Waits for the draws; hands over their arrays and the result dtypes.

        Raises:
            ValueError: If the draws were for other shapes or another generator, or were
                taken already.
        """
        arrays = self._arrays
        if arrays is None:
            raise ValueError("These prefetched normals were used already.")
        if rng is not self._rng:
            raise ValueError("The prefetched normals were drawn from another generator.")
        drawn = [a.shape for a in arrays]
        if drawn != [tuple(s) for s in shapes]:
            raise ValueError(f"The prefetched normals have shapes {drawn}, not {list(shapes)}.")
        self._arrays = None
        for future in self._pending:
            future.result()
        return arrays, self._dtypes


def prefetch_normals(
    shapes: Sequence[tuple[int, ...]],
    rng: np.random.Generator,
    dtypes: Sequence[DType] | None = None,
) -> PrefetchedNormals:
    """Starts drawing, in the noise threads, the normals `noised` would draw from `rng`.

    Spawns the same per-block streams from `rng` that `noised` would, so giving the result to
    `noised` yields the noise it would have drawn itself, bit for bit. `rng` must not then go
    to `noised` without them (spawning again would give other streams).

    Args:
        shapes: The shapes of the tensors that will be noised.
        rng: The round's noise source.
        dtypes: The floating dtype to store each noised result in (float64 by default); each
            element is computed in float64 and rounded once, as `astype` would round it.

    Raises:
        ValueError: If `dtypes` is not one floating dtype per shape.
    """
    out_dtypes = tuple(dtypes or [np.dtype(np.float64)] * len(shapes))
    if len(out_dtypes) != len(shapes) or not all(np.issubdtype(d, np.floating) for d in out_dtypes):
        raise ValueError(f"Need one floating dtype per shape, found {out_dtypes}.")
    arrays = tuple(np.empty(s, dtype=np.float64) for s in shapes)
    blocks = _blocks(arrays)
    pool = _noise_threads()
    pending = [
        pool.submit(_draw, block, stream)
        for block, stream in zip(blocks, rng.spawn(len(blocks)), strict=True)
    ]
    return PrefetchedNormals(rng, arrays, out_dtypes, pending)


def _draw(block: Tensor, stream: np.random.Generator) -> None:
    stream.standard_normal(out=block)  # numpy fills it without holding the GIL


def noised(
    tensors: Sequence[Tensor],
    std: float,
    rng: np.random.Generator,
    *,
    divisor: float = 1.0,
    normals: PrefetchedNormals | None = None,
) -> Tensors:
    """Returns new arrays: (the tensors plus independent N(0, std^2) noise) / divisor.

    Every element is computed in float64: a standard normal draw, times `std`, plus the
    tensor's value (a float32 value converts exactly), divided by `divisor`. The result is
    float64, or the dtypes `normals` name (rounded once from the float64 value). Each block of
    `_NOISE_BLOCK` elements has its own stream spawned from `rng` (numpy's `Generator.spawn`)
    and the blocks run in parallel threads, `_NOISE_STEP` elements at a time so each step
    after the draw reads what the cache holds; every element goes through the same operations
    in the same order as whole-array passes would, so the result is bit-identical to them.

    Args:
        tensors: Floating arrays.
        std: Noise standard deviation, >= 0.
        rng: The noise source; use `make_noise_rng()` in production.
        divisor: What the noised sums are divided by (a query's fixed denominator), > 0.
        normals: The draws `prefetch_normals` started for these tensors' shapes from `rng`,
            or None to draw them here; the values are the same either way.

    Raises:
        ValueError: If `std` is negative or not finite, `divisor` is not positive and finite,
            a tensor is not floating point, or `normals` do not fit (see `take`).
    """
    if not (math.isfinite(std) and std >= 0.0):
        raise ValueError(f"Noise `std` must be a non-negative finite number, found {std}.")
    check_positive_finite(divisor, "divisor")
    for t in tensors:
        if not np.issubdtype(t.dtype, np.floating):
            raise ValueError(f"Gaussian noise needs floating tensors, found dtype {t.dtype}.")
    shapes = [t.shape for t in tensors]
    if normals is None:
        # Drawn and computed in place in the float64 result.
        out = work = tuple(np.empty(s, dtype=np.float64) for s in shapes)
        streams: list[np.random.Generator | None] = list(rng.spawn(len(_blocks(out))))
    else:
        work, dtypes = normals.take(shapes, rng)
        # Computed in the draws' arrays, which are the result when it is float64.
        out = tuple(
            w if dtype == np.float64 else np.empty(w.shape, dtype=dtype)
            for w, dtype in zip(work, dtypes, strict=True)
        )
        streams = [None] * len(_blocks(work))
    # Whether each block's float64 work is rounded into a separate result array.
    separate = [o is not w for o, w in zip(out, work, strict=True) for _ in _blocks((o,))]
    jobs = list(zip(_blocks(out), _blocks(tensors), _blocks(work), streams, separate, strict=True))

    def finish(job: tuple[Tensor, Tensor, Tensor, np.random.Generator | None, bool]) -> None:
        result, values, work, stream, rounded = job
        with np.errstate(over="ignore"):  # a value beyond the result dtype becomes inf
            for start in range(0, result.size, _NOISE_STEP):
                stop = start + _NOISE_STEP
                step = work[start:stop]
                if stream is not None:
                    # The same numbers as drawing the block at once: the normal sampler
                    # consumes its stream element by element.
                    stream.standard_normal(out=step)
                np.multiply(step, std, out=step)
                np.add(step, values[start:stop], out=step)
                if divisor != 1.0:
                    np.divide(step, divisor, out=step)
                if rounded:
                    np.copyto(result[start:stop], step, casting="same_kind")

    if len(jobs) > 1:
        list(_noise_threads().map(finish, jobs))
    else:
        for job in jobs:
            finish(job)
    return out


def _blocks(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Flat views of `_NOISE_BLOCK` elements (the last of each tensor shorter), in order."""
    return [
        flat[start : start + _NOISE_BLOCK]
        for t in tensors
        for flat in [t.reshape(-1)]
        for start in range(0, flat.size, _NOISE_BLOCK)
    ]


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
