"""The PLD accountant's numbers for k rounds, bit for bit, without its per-call Python loops.

After every round the server asks for the epsilon of k rounds of a Poisson-sampled Gaussian
under `dp_accounting`'s PLD accountant (Koskela et al. 2020, arXiv 1906.03049, for composing
a discretised privacy loss distribution with FFTs; Doroshenko et al. 2022, arXiv 2207.04380,
for the pessimistic grid). In `dp_accounting` 0.4.3 each such question
(`PLDAccountant(...).compose(SelfComposedDpEvent(...)).get_epsilon(delta)`) recomputes the
one-round PMF's log moment generating function at 40 orders to bound the FFT's output, walks
both tails of the composed PMF in Python to truncate them, and walks it once more in Python to
find epsilon; together ~0.2 s of one core per round for a 10-of-1,000 sampled task, repeated
by every round close and budget check.

This module does the same floating-point operations in the same order, so every number is the
one `dp_accounting` computes (tests compare them bit for bit), but it keeps the log MGFs of a
step PMF (they do not depend on k), finds the truncation points with numpy's sequential
running sums, and finds epsilon with running sums too. The exponentials that enter epsilon's
sum come from `math.exp`, as in `dp_accounting`, because numpy's vectorised `exp` differs from
the C library's in the last bit of some values.
"""

import dataclasses
import math

import numpy as np
from numpy.typing import NDArray
from scipy import fft, signal, special

Probs = NDArray[np.float64]
# Chernoff orders (divided by the PMF's length), as `dp_accounting.pld.common` picks them.
_ORDER_STEPS = np.concatenate((np.arange(-20, 0), np.arange(1, 21)))
# Where the vectorised search may disagree with `math.log`, the scalar check decides.
_LOG_TOLERANCE = 1e-12
# Exponentials are computed exactly this far past the break the vectorised search found.
_EXACT_MARGIN = 256
_MAX_EXPONENT = 709.0


@dataclasses.dataclass(frozen=True)
class DensePmf:
    """A privacy loss PMF on the grid `(lower_loss + i) * discretization`, i < len(probs)."""

    lower_loss: int
    probs: Probs
    infinity_mass: float


@dataclasses.dataclass(frozen=True)
class StepPmf:
    """One round's PMF with the Chernoff inputs of its self-convolution, computed once."""

    pmf: DensePmf
    orders: Probs
    log_mgfs: tuple[float, ...]

    @classmethod
    def of(cls, pmf: DensePmf) -> "StepPmf":
        """Computes the log MGF of `pmf.probs` at the 40 orders `dp_accounting` uses."""
        n = len(pmf.probs)
        orders = _ORDER_STEPS / n
        index = np.arange(n)
        log_mgfs = tuple(special.logsumexp(index * order, b=pmf.probs) for order in orders)
        return cls(pmf, orders, log_mgfs)


def _convolution_bounds(step: StepPmf, num_times: int, tail_mass: float) -> tuple[int, int]:
    # Chernoff bounds on the indices of the num_times-fold self-convolution outside which at
    # most `tail_mass` lies (dp_accounting.pld.common.compute_self_convolve_bounds).
    upper = (len(step.pmf.probs) - 1) * num_times
    lower = 0
    log_two_over_tail = math.log(2 / tail_mass)
    for order, log_mgf in zip(step.orders, step.log_mgfs, strict=True):
        bound = (num_times * log_mgf + log_two_over_tail) / order
        if order > 0:
            upper = min(upper, math.ceil(bound))
        else:
            lower = max(lower, math.floor(bound))
    return lower, upper


def self_compose(step: StepPmf, num_times: int, tail_mass: float = 1e-15) -> DensePmf:
    """Returns the PMF of `num_times` rounds, as `DensePLDPmf.self_compose` computes it."""
    if num_times < 1:
        raise ValueError(f"num_times must be >= 1, got {num_times}.")
    probs = step.pmf.probs
    lower, upper = _convolution_bounds(step, num_times, tail_mass)
    length = upper - lower + 1
    size = fft.next_fast_len(max(length, len(probs)))
    # The DFT wraps around modulo `size`; the indices of interest start at `lower`.
    wrapped = np.real(fft.ifft(fft.fft(probs, size) ** num_times))
    composed = np.array(np.roll(wrapped, -lower)[:length])
    infinity = tail_mass - math.expm1(num_times * math.log1p(-step.pmf.infinity_mass))
    return DensePmf(step.pmf.lower_loss * num_times + lower, composed, infinity)


def _prefix_within(probs: Probs, threshold: float) -> int:
    # The longest prefix whose running sum stays <= threshold (left to right, like a loop).
    over = np.cumsum(probs) > threshold
    return int(np.argmax(over)) if over.any() else len(probs)


def compose(first: DensePmf, second: DensePmf, tail_mass: float = 1e-15) -> DensePmf:
    """Returns `first` composed with `second` on a pessimistic grid (`DensePLDPmf.compose`)."""
    probs = signal.fftconvolve(first.probs, second.probs)
    infinity = (
        first.infinity_mass + second.infinity_mass - first.infinity_mass * second.infinity_mass
    )
    left = right = 0
    right_mass = 0.0
    if tail_mass != 0:
        left = _prefix_within(probs, tail_mass / 2)
        right = len(probs) - _prefix_within(np.flip(probs), tail_mass / 2)
        right = max(right, left + 1)
        left_mass = np.sum(probs[:left])
        right_mass = np.sum(probs[right:])
        probs = probs[left:right]
        probs[0] += left_mass  # pessimistic: the left tail moves onto the smallest loss
    return DensePmf(first.lower_loss + second.lower_loss + left, probs, infinity + right_mass)


def epsilon_for_delta(pmf: DensePmf, discretization: float, delta: float) -> float:
    """Returns the smallest epsilon whose hockey-stick divergence is <= delta (inf if none).

    Walks the losses from the largest down, as `DensePLDPmf.get_epsilon_for_delta` does, and
    stops at the first loss below the epsilon the masses seen so far give.
    """
    if pmf.infinity_mass > delta:
        return math.inf
    n = len(pmf.probs)
    # itertools.count over floats adds the step again and again; so does this running sum.
    top = (pmf.lower_loss + n - 1) * discretization
    losses = np.cumsum(np.concatenate(([top], np.full(max(n - 1, 0), -discretization))))[:n]
    probs = pmf.probs[::-1]
    mass_upper = np.cumsum(np.concatenate(([pmf.infinity_mass], probs)))
    # A vectorised pass finds roughly where the walk stops; the exact pass starts there.
    with np.errstate(over="ignore"):
        rough = np.cumsum(np.concatenate(([0.0], np.exp(-losses) * probs)))
    stop = _first_stop(mass_upper[:n], rough[:n], losses, delta, exact=False)
    end = n if stop is None else min(n, stop + _EXACT_MARGIN)
    while True:
        # Clipped where math.exp would overflow: a walk that reached such a loss (below
        # -709, far outside any PMF the accountant keeps) would fail in dp_accounting.
        exponents = np.minimum(-losses[:end], _MAX_EXPONENT).tolist()
        terms = np.fromiter(map(math.exp, exponents), np.float64, end)
        mass_lower = np.cumsum(np.concatenate(([0.0], terms * probs[:end])))
        stop = _first_stop(mass_upper[:end], mass_lower[:end], losses[:end], delta, exact=True)
        if stop is not None or end == n:
            break
        end = n
    steps = n if stop is None else stop
    # The walk returns early where all of the upper mass so far sits at losses whose
    # exponential underflowed to zero lower mass.
    zero_lower = np.flatnonzero(
        (mass_upper[1 : steps + 1] >= delta) & (mass_lower[1 : steps + 1] == 0)
    )
    if len(zero_lower):
        return max(0.0, float(losses[zero_lower[0]]))
    upper, lower = mass_upper[steps], mass_lower[steps]
    if upper <= lower + delta:
        return 0.0
    return math.log((upper - delta) / lower)


def _first_stop(
    mass_upper: Probs, mass_lower: Probs, losses: Probs, delta: float, *, exact: bool
) -> int | None:
    # First i with mass_upper[i] > delta, mass_lower[i] > 0 and
    # log((mass_upper[i] - delta) / mass_lower[i]) >= losses[i]: epsilon >= that loss.
    live = (mass_upper > delta) & (mass_lower > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.where(live, np.log((mass_upper - delta) / mass_lower) - losses, -np.inf)
    if not exact:
        hits = np.flatnonzero(gap >= 0)
        return int(hits[0]) if len(hits) else None
    tolerance = _LOG_TOLERANCE * np.maximum(1.0, np.abs(losses))
    sure = np.flatnonzero(gap > tolerance)
    first = int(sure[0]) if len(sure) else None
    for i in np.flatnonzero(np.abs(gap) <= tolerance):
        if first is not None and i >= first:
            break
        if math.log((mass_upper[i] - delta) / mass_lower[i]) >= losses[i]:
            return int(i)
    return first
