"""Run-time privacy accounting: epsilon spent after some rounds, noise calibration, round budget.

The server calls it after every round (and before opening the next) to record the epsilon a
task has spent and to stop the task before a round would exceed `dp_target_epsilon`; the task
builder uses the same functions at build time. It follows ODP's task builder (`dp_utils.py`;
odp-federated-compute.md section 1.7) with Google's `dp_accounting` 0.4.3 and no TensorFlow:

* FIXED_GAUSSIAN / ADAPTIVE_GAUSSIAN (DP-FedAvg, McMahan et al. 2018, arXiv 1710.06963):
  `SelfComposedDpEvent(PoissonSampledDpEvent(q = report_goal / population_size,
  GaussianDpEvent(z)), rounds)` under the PLD accountant. Adaptive clipping costs nothing
  extra because its z is the effective total (Andrew et al. 2021, arXiv 1905.03871).
* TREE_AGGREGATION / ADAPTIVE_TREE (DP-FTRL, Kairouz et al. 2021, arXiv 2103.00039):
  `SingleEpochTreeAggregationDpEvent(z, [rounds])` under the RDP accountant with
  REPLACE_SPECIAL neighbours; the sampling rate does not enter.

ODP's defaults apply to unset fields: population 3,000,000 and delta 1 / 3,000,000. The
Poisson-sampling assumption is optimistic for check-in based selection (tff-dp-flex-facts.md
section 3.2), so the Gaussian figures are what ODP reports, not a proof about a deployment.
Results are cached: the same question is asked after every round. The Gaussian epsilons come
from `pld_composition`: the PLD accountant's numbers bit for bit, ~3x faster per round. The
worker asks ahead of time (`services.accounting_prefetch`) from a thread of its own, so the
one-round PLD is built under a lock: a round close that needs it meanwhile waits for it
instead of building it again.
"""

import dataclasses
import functools
import math
import threading
from collections.abc import Callable

import dp_accounting
from dp_accounting import pld, rdp
from dp_accounting.pld import pld_pmf as _PMF
from dp_accounting.pld import privacy_loss_distribution as _PLD

from fcp_server import pld_composition
from fcp_server.protos import plan_pb2, task_builder_pb2

DEFAULT_POPULATION_SIZE = 3_000_000
DEFAULT_DELTA = 1.0 / DEFAULT_POPULATION_SIZE
# Bounds the inputs (and the round search) to what a task can plausibly run.
MAX_ROUNDS = 10_000_000
PLD = "PLD"
RDP = "RDP"
_DpType = task_builder_pb2.DpAggregator
GAUSSIAN_TYPES = (_DpType.FIXED_GAUSSIAN, _DpType.ADAPTIVE_GAUSSIAN)
TREE_TYPES = (_DpType.TREE_AGGREGATION, _DpType.ADAPTIVE_TREE)
# Relative parameter tolerance of the noise search: epsilon lands well within 1% of target.
_CALIBRATION_RTOL = 1e-4
_MAX_BRACKET_STEPS = 60
_SEARCH_DISCRETIZATION = 1e-3
# `pld.PLDAccountant`'s default grid, which `epsilon_spent` reproduces.
_PLD_DISCRETIZATION = 1e-4
# Held while a PLD epsilon is computed (see the module docstring); re-entrant for the searches.
_PLD_LOCK = threading.RLock()


@dataclasses.dataclass(frozen=True)
class DpSetup:
    """What the epsilon of a DP task depends on besides the number of rounds."""

    # A DpAggregator value other than UNKNOWN.
    dp_type: int
    # z: noise stddev / clip on the sum (the effective total for the adaptive types).
    noise_multiplier: float
    # Clients per round (the sampling rate's numerator; unused by the tree bound).
    report_goal: int
    population_size: int = DEFAULT_POPULATION_SIZE
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        """Validates every field with a message naming it."""
        if self.dp_type not in GAUSSIAN_TYPES + TREE_TYPES:
            raise ValueError(f"No privacy accounting for DP aggregator type {self.dp_type}.")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0.0):
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}.")
        if not 0 < self.report_goal <= self.population_size:
            raise ValueError(
                "need 0 < report_goal <= population_size, got "
                f"{self.report_goal} and {self.population_size}."
            )
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}.")

    @classmethod
    def from_spec(cls, spec: plan_pb2.AggregationSpec, report_goal: int = 0) -> "DpSetup":
        """Reads a plan's AggregationSpec, with ODP's defaults for unset fields.

        Args:
            spec: The plan's aggregation settings (dp_type must not be UNKNOWN).
            report_goal: Used when `spec.clients_per_round` is unset.

        Raises:
            ValueError: If the spec has no DP aggregator or invalid values.
        """
        return cls(
            dp_type=int(spec.dp_type),
            noise_multiplier=spec.noise_multiplier,
            report_goal=int(spec.clients_per_round or report_goal),
            population_size=int(spec.population_size or DEFAULT_POPULATION_SIZE),
            delta=spec.dp_delta or DEFAULT_DELTA,
        )

    @property
    def sampling_probability(self) -> float:
        """Returns q = report_goal / population_size."""
        return self.report_goal / self.population_size

    def with_noise(self, noise_multiplier: float) -> "DpSetup":
        """Returns a copy with another noise multiplier."""
        return dataclasses.replace(self, noise_multiplier=noise_multiplier)


def accountant_name(dp_type: int) -> str:
    """Returns "RDP" for the tree aggregators and "PLD" for the Gaussian ones."""
    return RDP if dp_type in TREE_TYPES else PLD


def _check_rounds(rounds: int) -> None:
    if not 0 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds must be in [0, {MAX_ROUNDS}], got {rounds}.")


def make_dp_event(setup: DpSetup, rounds: int) -> dp_accounting.DpEvent:
    """Returns the dp_accounting event of `rounds` rounds (NoOpDpEvent for 0 rounds).

    Raises:
        ValueError: If `rounds` is out of range.
    """
    _check_rounds(rounds)
    if rounds == 0:
        return dp_accounting.NoOpDpEvent()
    z = setup.noise_multiplier
    if setup.dp_type in TREE_TYPES:
        return dp_accounting.SingleEpochTreeAggregationDpEvent(z, [rounds])
    sampled = dp_accounting.PoissonSampledDpEvent(
        setup.sampling_probability, dp_accounting.GaussianDpEvent(z)
    )
    return dp_accounting.SelfComposedDpEvent(sampled, rounds)


def make_accountant(dp_type: int) -> dp_accounting.PrivacyAccountant:
    """Returns a fresh accountant for the aggregator type (ODP's choice, default settings)."""
    if dp_type in TREE_TYPES:
        return rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL
        )
    return pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)


@functools.lru_cache(maxsize=1024)
def epsilon_spent(setup: DpSetup, rounds: int) -> float:
    """Returns the epsilon spent at `setup.delta` after `rounds` rounds.

    0 rounds spend nothing; a zero noise multiplier spends infinity.

    Raises:
        ValueError: If `rounds` is out of range.
    """
    _check_rounds(rounds)
    if rounds == 0:
        return 0.0
    if setup.noise_multiplier == 0.0:
        return math.inf
    if setup.dp_type in TREE_TYPES:
        accountant = make_accountant(setup.dp_type)
        accountant.compose(make_dp_event(setup, rounds))
        return float(accountant.get_epsilon(setup.delta))
    with _PLD_LOCK:  # a second caller finds the first one's result in the cache
        return _pld_epsilon_spent(setup, rounds)


@functools.lru_cache(maxsize=1024)
def _pld_epsilon_spent(setup: DpSetup, rounds: int) -> float:
    # What `PLDAccountant` computes for this event, bit for bit, without rebuilding the
    # one-round PLD (~2 s for q around 0.1) every time a round ends, and without its Python
    # loops (`pld_composition`).
    steps = _step_pmfs(setup.noise_multiplier, setup.sampling_probability)
    if steps is None:  # a small (sparse) PMF: dp_accounting's own path is quick
        step = _subsampled_gaussian_pld(setup.noise_multiplier, setup.sampling_probability)
        composed = _PLD.identity(value_discretization_interval=_PLD_DISCRETIZATION).compose(
            step.self_compose(rounds)
        )
        return float(composed.get_epsilon_for_delta(setup.delta))
    identity = _identity_pmf()
    return max(
        pld_composition.epsilon_for_delta(
            pld_composition.compose(identity, pld_composition.self_compose(step, rounds)),
            _PLD_DISCRETIZATION,
            setup.delta,
        )
        for step in steps
    )


@functools.lru_cache(maxsize=32)
def _subsampled_gaussian_pld(
    noise_multiplier: float, sampling_probability: float
) -> _PLD.PrivacyLossDistribution:
    """One round's PLD, as `pld.PLDAccountant` builds it for a Poisson-sampled Gaussian."""
    return _PLD.PrivacyLossDistribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=_PLD_DISCRETIZATION,
        sampling_prob=sampling_probability,
    )


@functools.lru_cache(maxsize=32)
def _step_pmfs(
    noise_multiplier: float, sampling_probability: float
) -> tuple[pld_composition.StepPmf, ...] | None:
    # The one-round PLD's dense PMFs (remove, and add unless the PLD is symmetric) with
    # their Chernoff inputs; None when dp_accounting keeps a PMF sparse.
    step = _subsampled_gaussian_pld(noise_multiplier, sampling_probability)
    pmfs = [step._pmf_remove] if step._symmetric else [step._pmf_remove, step._pmf_add]
    if not all(isinstance(pmf, _PMF.DensePLDPmf) for pmf in pmfs):
        return None
    return tuple(pld_composition.StepPmf.of(_dense(pmf)) for pmf in pmfs)


@functools.cache
def _identity_pmf() -> pld_composition.DensePmf:
    # The accountant's starting point: what its first composition convolves with.
    return _dense(
        _PLD.identity(value_discretization_interval=_PLD_DISCRETIZATION)._pmf_remove.to_dense_pmf()
    )


def _dense(pmf: _PMF.DensePLDPmf) -> pld_composition.DensePmf:
    if pmf._discretization != _PLD_DISCRETIZATION or not pmf._pessimistic_estimate:
        raise ValueError("the accountant's PMFs are pessimistic on the default grid")
    return pld_composition.DensePmf(pmf._lower_loss, pmf._probs, pmf._infinity_mass)


def epsilon_after(
    spec: plan_pb2.AggregationSpec, rounds: int, report_goal: int = 0
) -> float | None:
    """Returns the epsilon a plan has spent after `rounds` rounds; None without DP.

    Raises:
        ValueError: If the spec's DP fields or `rounds` are invalid.
    """
    if spec.dp_type == _DpType.UNKNOWN:
        return None
    return epsilon_spent(DpSetup.from_spec(spec, report_goal), rounds)


@functools.lru_cache(maxsize=256)
def max_rounds_within_budget(
    setup: DpSetup, target_epsilon: float, max_rounds: int = MAX_ROUNDS
) -> int:
    """Returns the largest number of rounds, at most `max_rounds`, whose epsilon <= target.

    Epsilon does not decrease with the number of rounds, so a binary search over the
    (cached) `epsilon_spent` finds it in O(log max_rounds) accountings.

    Raises:
        ValueError: If `target_epsilon` is negative or `max_rounds` is out of range.
    """
    if not target_epsilon >= 0.0:
        raise ValueError(f"target_epsilon must be >= 0, got {target_epsilon}.")
    _check_rounds(max_rounds)
    if epsilon_spent(setup, max_rounds) <= target_epsilon:
        return max_rounds
    low, high = 0, max_rounds  # epsilon(low) <= target < epsilon(high)
    while high - low > 1:
        mid = (low + high) // 2
        if epsilon_spent(setup, mid) <= target_epsilon:
            low = mid
        else:
            high = mid
    return low


def calibrate_noise(setup: DpSetup, target_epsilon: float, rounds: int) -> float:
    """Returns the smallest noise multiplier spending at most `target_epsilon` in `rounds`.

    Uses `dp_accounting.calibrate_dp_mechanism` with the type's accountant. For the Gaussian
    types the PLD search is bracketed by the (looser, much faster) RDP answer, which needs at
    least as much noise, and runs on a coarse (pessimistic) grid; the answer is then checked
    with the default accountant that `epsilon_spent` uses. `setup.noise_multiplier` is
    ignored.

    Raises:
        ValueError: If `target_epsilon` is not positive or `rounds` is not in [1, MAX_ROUNDS].
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0.0):
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}.")
    _check_rounds(rounds)
    if rounds == 0:
        raise ValueError("Cannot calibrate noise for 0 rounds.")

    def event(z: float) -> dp_accounting.DpEvent:
        return make_dp_event(setup.with_noise(z), rounds)

    def fresh() -> dp_accounting.PrivacyAccountant:
        return make_accountant(setup.dp_type)

    if setup.dp_type in TREE_TYPES:
        return float(
            dp_accounting.calibrate_dp_mechanism(fresh, event, target_epsilon, setup.delta)
        )
    upper = float(
        dp_accounting.calibrate_dp_mechanism(rdp.RdpAccountant, event, target_epsilon, setup.delta)
    )
    lower = _lower_bracket(event, upper, target_epsilon, setup.delta)
    z = float(
        dp_accounting.calibrate_dp_mechanism(
            _coarse_pld,
            event,
            target_epsilon,
            setup.delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lower, upper),
            tol=upper * _CALIBRATION_RTOL,
        )
    )
    # The coarse grid is pessimistic, so the default accountant should agree; make sure.
    for _ in range(_MAX_BRACKET_STEPS):
        if epsilon_spent(setup.with_noise(z), rounds) <= target_epsilon:
            return z
        z *= 1.0 + _CALIBRATION_RTOL
    raise ArithmeticError(f"Noise calibration did not converge for epsilon {target_epsilon}.")


def _coarse_pld() -> dp_accounting.PrivacyAccountant:
    # A coarser PLD grid for the search only: ~10x faster and pessimistic (never optimistic).
    return pld.PLDAccountant(value_discretization_interval=_SEARCH_DISCRETIZATION)


def _lower_bracket(
    event: Callable[[float], dp_accounting.DpEvent], upper: float, target: float, delta: float
) -> float:
    # Walk down from the RDP multiplier until PLD's epsilon exceeds the target.
    z = upper
    for _ in range(_MAX_BRACKET_STEPS):
        z *= 0.7
        accountant = _coarse_pld()
        accountant.compose(event(z))
        if accountant.get_epsilon(delta) > target:
            return z
    raise ArithmeticError(f"No noise multiplier below {upper} exceeds epsilon {target}.")
