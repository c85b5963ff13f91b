"""DP accounting of a training task: epsilon for a noise multiplier, or the multiplier for a target.

Step 2 of the build pipeline, as ODP's `dp_utils.validate_fcp_dp` (odp-federated-compute.md
section 1.7; tff-dp-flex-facts.md section 3) with Google's dp_accounting 0.4.3:
  * Gaussian types (DP-FedAvg, McMahan et al. 2018, arXiv 1710.06963):
    SelfComposed(PoissonSampled(q = report_goal / population_size, Gaussian(z)), rounds)
    under the PLD accountant;
  * tree types (DP-FTRL, Kairouz et al. 2021, arXiv 2103.00039):
    SingleEpochTreeAggregation(z, [rounds]) under RDP with REPLACE_SPECIAL neighbours.
The events, accountants and noise search are `fcp_server.accounting`'s, the same code the server
runs after every round, so the build-time check and the run-time epsilon cannot disagree.
Adaptive clipping spends no extra epsilon here because TFF's `noise_multiplier` is the effective
total of the value and clipped-count noise.
"""

import dataclasses
import math
from typing import Any

from fcp_server import accounting
from fcp_server.protos import task_builder_pb2
from task_builder import config_defaults as d
from task_builder.errors import DpBudgetError

PLD = accounting.PLD
RDP = accounting.RDP
accountant_name = accounting.accountant_name


def _setup(
    dp_type: int,
    noise_multiplier: float,
    report_goal: int,
    population_size: int,
    rounds: int,
    delta: float = accounting.DEFAULT_DELTA,
) -> accounting.DpSetup:
    # The build always accounts a positive number of rounds; the server's accounting (shared
    # here so build time and run time can never disagree) also accepts 0.
    if rounds <= 0:
        raise ValueError(f"rounds must be positive, got {rounds}")
    return accounting.DpSetup(dp_type, noise_multiplier, report_goal, population_size, delta)


def make_dp_event(
    dp_type: int, noise_multiplier: float, report_goal: int, population_size: int, rounds: int
) -> Any:
    """Returns the dp_accounting event of `rounds` rounds of the given aggregator."""
    setup = _setup(dp_type, noise_multiplier, report_goal, population_size, rounds)
    return accounting.make_dp_event(setup, rounds)


def compute_epsilon(
    dp_type: int,
    noise_multiplier: float,
    report_goal: int,
    population_size: int,
    rounds: int,
    delta: float,
) -> float:
    """Returns the epsilon spent at `delta` by `rounds` rounds (inf when the multiplier is 0)."""
    setup = _setup(dp_type, noise_multiplier, report_goal, population_size, rounds, delta)
    return accounting.epsilon_spent(setup, rounds)


def calibrate_noise_multiplier(
    dp_type: int,
    target_epsilon: float,
    report_goal: int,
    population_size: int,
    rounds: int,
    delta: float,
) -> float:
    """Returns the smallest noise multiplier whose epsilon at `delta` is at most the target.

    The search is `fcp_server.accounting.calibrate_noise`; `compute_epsilon` of the answer
    never exceeds the target.
    """
    setup = _setup(dp_type, 1.0, report_goal, population_size, rounds, delta)
    return accounting.calibrate_noise(setup, target_epsilon, rounds)


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
        z = calibrate_noise_multiplier(dp.type, release.dp_target_epsilon, *args)
        epsilon = compute_epsilon(dp.type, z, *args)
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
