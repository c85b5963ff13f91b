"""DP accounting of a training task: epsilon for a noise multiplier, or the multiplier for a target.

Step 2 of the build pipeline, as ODP's `dp_utils.validate_fcp_dp` (odp-federated-compute.md
section 1.7; tff-dp-flex-facts.md section 3) with Google's dp_accounting 0.4.3:
  * Gaussian types (DP-FedAvg, McMahan et al. 2018, arXiv 1710.06963):
    SelfComposed(PoissonSampled(q = report_goal / population_size, Gaussian(z)), rounds)
    under the PLD accountant;
  * tree types (DP-FTRL, Kairouz et al. 2021, arXiv 2103.00039):
    SingleEpochTreeAggregation(z, [rounds]) under RDP with REPLACE_SPECIAL neighbours.
The functions of (dp_type, z, report_goal, population_size, rounds, delta) are pure and import
neither TensorFlow nor the builder, so the server can reuse them for run-time accounting.
Adaptive clipping spends no extra epsilon here because TFF's `noise_multiplier` is the effective
total of the value and clipped-count noise.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp

from fcp_server.protos import task_builder_pb2
from task_builder import config_defaults as d
from task_builder.errors import DpBudgetError

PLD = "PLD"
RDP = "RDP"
# Relative tolerance of the calibrated multiplier: epsilon then lands within ~0.1% of target.
_CALIBRATION_RTOL = 1e-4
# A coarser PLD grid for the search only (pessimistic, so it never undershoots epsilon); the
# reported epsilon is always recomputed with the default accountant, as the reference does.
_SEARCH_DISCRETIZATION = 1e-3
_MAX_BRACKET_STEPS = 40


def accountant_name(dp_type: int) -> str:
    """Returns "RDP" for the tree aggregators and "PLD" for the Gaussian ones."""
    return RDP if dp_type in d.TREE_DP_TYPES else PLD


def _check_args(report_goal: int, population_size: int, rounds: int) -> None:
    if rounds <= 0:
        raise ValueError(f"rounds must be positive, got {rounds}")
    if not 0 < report_goal <= population_size:
        raise ValueError(
            f"need 0 < report_goal <= population_size, got {report_goal} and {population_size}"
        )


def make_dp_event(
    dp_type: int, noise_multiplier: float, report_goal: int, population_size: int, rounds: int
) -> Any:
    """Returns the dp_accounting event of `rounds` rounds of the given aggregator."""
    _check_args(report_goal, population_size, rounds)
    if dp_type in d.TREE_DP_TYPES:
        # The tree bound needs each device at most once per run; report_goal does not enter.
        return dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, [rounds])
    q = report_goal / population_size
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier)),
        rounds,
    )


def make_accountant(dp_type: int, *, discretization: float | None = None) -> Any:
    """Returns a fresh accountant for the aggregator type (PLD default grid unless given)."""
    if dp_type in d.TREE_DP_TYPES:
        return rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL
        )
    if discretization is None:
        return pld.PLDAccountant()
    return pld.PLDAccountant(value_discretization_interval=discretization)


def compute_epsilon(
    dp_type: int,
    noise_multiplier: float,
    report_goal: int,
    population_size: int,
    rounds: int,
    delta: float,
) -> float:
    """Returns the epsilon spent at `delta` by `rounds` rounds (inf when the multiplier is 0)."""
    if noise_multiplier <= 0:
        return math.inf
    accountant = make_accountant(dp_type)
    accountant.compose(
        make_dp_event(dp_type, noise_multiplier, report_goal, population_size, rounds)
    )
    return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(
    dp_type: int,
    target_epsilon: float,
    report_goal: int,
    population_size: int,
    rounds: int,
    delta: float,
) -> float:
    """Returns the smallest noise multiplier whose epsilon at `delta` is at most the target.

    Uses dp_accounting.calibrate_dp_mechanism. For the Gaussian types the search is bracketed by
    the (looser, fast) RDP answer and run on a coarse PLD grid; the result is then checked with
    the default PLD accountant so that `compute_epsilon` of it never exceeds the target.
    """
    return _calibrate(dp_type, target_epsilon, report_goal, population_size, rounds, delta)[0]


def _calibrate(
    dp_type: int,
    target_epsilon: float,
    report_goal: int,
    population_size: int,
    rounds: int,
    delta: float,
) -> tuple[float, float]:
    """Returns (noise multiplier, its epsilon by `compute_epsilon`)."""
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be positive, got {target_epsilon}")
    _check_args(report_goal, population_size, rounds)

    def event(z: float) -> Any:
        return make_dp_event(dp_type, z, report_goal, population_size, rounds)

    def epsilon(z: float) -> float:
        return compute_epsilon(dp_type, z, report_goal, population_size, rounds, delta)

    if dp_type in d.TREE_DP_TYPES:
        z = float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: make_accountant(dp_type), event, target_epsilon, delta
            )
        )
        return z, epsilon(z)
    upper = float(
        dp_accounting.calibrate_dp_mechanism(rdp.RdpAccountant, event, target_epsilon, delta)
    )
    coarse = lambda: make_accountant(dp_type, discretization=_SEARCH_DISCRETIZATION)  # noqa: E731
    lower = _lower_bracket(coarse, event, upper, target_epsilon, delta)
    z = float(
        dp_accounting.calibrate_dp_mechanism(
            coarse,
            event,
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lower, upper),
            tol=upper * _CALIBRATION_RTOL,
        )
    )
    # The coarse grid is pessimistic, so the default one should agree; make sure it does.
    for _ in range(_MAX_BRACKET_STEPS):
        eps = epsilon(z)
        if eps <= target_epsilon:
            return z, eps
        z *= 1 + _CALIBRATION_RTOL
    raise ArithmeticError(f"noise calibration did not converge for epsilon {target_epsilon}")


def _lower_bracket(
    make_acc: Callable[[], Any],
    event: Callable[[float], Any],
    upper: float,
    target_epsilon: float,
    delta: float,
) -> float:
    # Walk down from the RDP multiplier until epsilon exceeds the target (PLD is tighter).
    z = upper
    for _ in range(_MAX_BRACKET_STEPS):
        z *= 0.7
        accountant = make_acc()
        accountant.compose(event(z))
        if accountant.get_epsilon(delta) > target_epsilon:
            return z
    raise ArithmeticError(f"no noise multiplier below {upper} exceeds epsilon {target_epsilon}")


@dataclasses.dataclass(frozen=True)
class DpAccounting:
    """The privacy guarantee of a training task, as reported in TaskReport.dp_hyperparameters."""

    noise_multiplier: float  # z: noise stddev / clip norm on the sum of client updates
    clip_norm: float  # clip_norm (fixed types) or init_clip_norm (adaptive types)
    epsilon: float  # spent at `delta` by all rounds; inf without a DP aggregator
    delta: float
    target_epsilon: float
    rounds: int
    accountant: str  # "PLD", "RDP", or "NONE" when the DP aggregator is skipped
    population_size: int
    sampling_probability: float  # report_goal / population_size (unused by the tree bound)
    noise_calibrated: bool  # z was computed from target_epsilon, not given


def account(config: task_builder_pb2.TaskConfig, *, skip_dp_aggregator: bool) -> DpAccounting:
    """Accounts the normalized config's DP setup (calibrating an unset noise multiplier).

    An unset (0) noise multiplier is calibrated to dp_target_epsilon. Without a DP aggregator no
    noise is added, so epsilon is infinite.

    Raises:
      DpBudgetError: when an adaptive aggregator could not be built with the multiplier.
    """
    dp = config.differential_privacy
    release = config.policies.model_release_policy
    goal = config.federated_learning.learning_process.runtime_config.report_goal
    rounds = release.num_max_training_rounds
    args = (goal, dp.population_size, rounds, release.dp_delta)
    calibrate = not skip_dp_aggregator and dp.noise_multiplier == 0
    if calibrate:
        z, epsilon = _calibrate(dp.type, release.dp_target_epsilon, *args)
    else:
        z = dp.noise_multiplier
        epsilon = math.inf if skip_dp_aggregator else compute_epsilon(dp.type, z, *args)
    if not skip_dp_aggregator:
        _check_adaptive_noise(config, z)
    return DpAccounting(
        noise_multiplier=z,
        clip_norm=dp.init_clip_norm if dp.type in d.ADAPTIVE_DP_TYPES else dp.clip_norm,
        epsilon=epsilon,
        delta=release.dp_delta,
        target_epsilon=release.dp_target_epsilon,
        rounds=rounds,
        accountant="NONE" if skip_dp_aggregator else accountant_name(dp.type),
        population_size=dp.population_size,
        sampling_probability=goal / dp.population_size,
        noise_calibrated=calibrate,
    )


def enforce(accounting: DpAccounting, *, skip_dp_check: bool) -> None:
    """Rejects a setup whose epsilon exceeds its target, unless `skip_dp_check`.

    Raises:
      DpBudgetError: naming the computed epsilon, the target, delta and rounds.
    """
    if accounting.epsilon <= accounting.target_epsilon or skip_dp_check:
        return
    why = " (no DP aggregator: --skip_dp_aggregator)" if accounting.accountant == "NONE" else ""
    raise DpBudgetError(
        "[Invalid task config]: differential_privacy setup is not private enough to pass DP "
        f"accounting check: epsilon {accounting.epsilon:.6g}{why} exceeds dp_target_epsilon "
        f"{accounting.target_epsilon:g} at delta {accounting.delta:.6g} after "
        f"{accounting.rounds} rounds with noise_multiplier {accounting.noise_multiplier:g}."
    )


def check_dp_budget(
    config: task_builder_pb2.TaskConfig, *, skip_dp_check: bool, skip_dp_aggregator: bool
) -> DpAccounting:
    """`account` then `enforce`: the whole DP step of the build.

    `skip_dp_check` skips only the rejection; the accounting always happens.

    Raises:
      DpBudgetError: when epsilon exceeds dp_target_epsilon and skip_dp_check is false.
    """
    accounting = account(config, skip_dp_aggregator=skip_dp_aggregator)
    enforce(accounting, skip_dp_check=skip_dp_check)
    return accounting


def _check_adaptive_noise(config: task_builder_pb2.TaskConfig, z: float) -> None:
    # TFF's adaptive aggregators split z into value and clipped-count noise and need
    # z < 2 * clipped_count_stddev, else they raise at build time; say so in config terms.
    dp = config.differential_privacy
    if dp.type in d.ADAPTIVE_DP_TYPES and z >= 2 * dp.clipped_count_stddev:
        raise DpBudgetError(
            "[Invalid task config]: key `noise_multiplier` has a bad value: "
            f"`{z:g}` in `differential_privacy`. Adaptive clipping needs noise_multiplier < "
            f"2 * clipped_count_stddev = {2 * dp.clipped_count_stddev:g}; raise report_goal "
            "or clipped_count_stddev."
        )
