"""The server's DP budget bookkeeping: epsilon after each round and the stop before overspending.

A thin adapter from a task's server plan to `fcp_server.accounting` (ODP task builder's
`dp_utils` recipe with Google's `dp_accounting`: PLD over Poisson-sampled Gaussian rounds for
the Gaussian aggregators, the RDP tree event of DP-FTRL, Kairouz et al. 2021, arXiv
2103.00039, for the tree aggregators). The accounting itself lives there only, cached, so the
server and the task builder report the same figures.

After every training round the epsilon spent by the rounds actually run goes to the round's
metrics file and the task row; a task stops before the round that would exceed the plan's
`dp_target_epsilon`, and a task whose first round alone would exceed it never opens.
"""

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator

from fcp_server import accounting
from fcp_server.protos import plan_pb2, task_builder_pb2


@dataclasses.dataclass(frozen=True)
class RoundBudget:
    """The DP facts of a task after some rounds."""

    # Epsilon spent at the plan's delta; None without a DP aggregator.
    epsilon: float | None
    # True when the next round would spend more than the target epsilon.
    exhausted: bool
    # Flat metrics ("server/dp/...") for the round's metrics file; empty without DP.
    metrics: dict[str, float]


# dp_accounting's PLD grid grows like 1 / z^2: below this a single accounting of a Gaussian
# plan takes minutes and gigabytes (z = 1e-6 asks numpy for petabytes), so such plans are
# refused. The tree types use the RDP accountant, which has no such cost.
MIN_PLD_NOISE_MULTIPLIER = 0.1


@contextlib.contextmanager
def _scipy_deprecation_silenced() -> Iterator[None]:
    # scipy 1.9 (pinned by TFF) calls a numpy 1.25-deprecated function inside dp_accounting's
    # PLD; the warning is about scipy's code, not about this accounting.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "np.find_common_type is deprecated", DeprecationWarning)
        yield


def dp_setup(plan: plan_pb2.ServerPlan) -> accounting.DpSetup | None:
    """Returns the plan's accounting setup, None when it has no DP aggregator.

    Raises:
        ValueError: If the plan's DP fields are invalid.
    """
    if plan.aggregation.dp_type == task_builder_pb2.DpAggregator.UNKNOWN:
        return None
    setup = accounting.DpSetup.from_spec(plan.aggregation, int(plan.report_goal))
    z = setup.noise_multiplier
    if setup.dp_type in accounting.GAUSSIAN_TYPES and 0.0 < z < MIN_PLD_NOISE_MULTIPLIER:
        raise ValueError(
            f"noise_multiplier {z} is below {MIN_PLD_NOISE_MULTIPLIER}, too little noise for the "
            "PLD accountant to account within bounded memory"
        )
    return setup


def planned_rounds(plan: plan_pb2.ServerPlan, total_iteration: int) -> int:
    """Returns the most rounds the task can run: the plan's num_rounds.

    The builder sets both `num_rounds` and the task's `total_iteration` from
    `num_max_training_rounds`; the larger is used so the budget search never stops a task
    early because a hand-made plan left `num_rounds` unset or smaller.
    """
    return min(max(int(plan.num_rounds), total_iteration, 1), accounting.MAX_ROUNDS)


def rounds_within_budget(plan: plan_pb2.ServerPlan, total_iteration: int) -> int | None:
    """Returns how many rounds fit in `dp_target_epsilon`; None without DP or without target.

    Raises:
        ValueError: If the plan's DP fields are invalid.
    """
    setup = dp_setup(plan)
    target = plan.aggregation.dp_target_epsilon
    if setup is None or target <= 0.0:
        return None
    with _scipy_deprecation_silenced():
        return accounting.max_rounds_within_budget(
            setup, target, max_rounds=planned_rounds(plan, total_iteration)
        )


def epsilon_after(plan: plan_pb2.ServerPlan, rounds: int) -> float | None:
    """Returns the epsilon spent after `rounds` rounds at the plan's delta; None without DP.

    Raises:
        ValueError: If the plan's DP fields or `rounds` are invalid.
    """
    setup = dp_setup(plan)
    if setup is None:
        return None
    with _scipy_deprecation_silenced():
        return accounting.epsilon_spent(setup, rounds)


def after_rounds(plan: plan_pb2.ServerPlan, total_iteration: int, rounds_done: int) -> RoundBudget:
    """Returns the epsilon spent after `rounds_done` rounds and whether to stop.

    Args:
        plan: The training task's server plan.
        total_iteration: The task's round count.
        rounds_done: Training rounds aggregated so far (retried attempts count once).

    Raises:
        ValueError: If the plan's DP fields or `rounds_done` are invalid.
    """
    setup = dp_setup(plan)
    if setup is None:
        return RoundBudget(epsilon=None, exhausted=False, metrics={})
    with _scipy_deprecation_silenced():
        epsilon = accounting.epsilon_spent(setup, rounds_done)
    allowed = rounds_within_budget(plan, total_iteration)
    metrics = {
        "server/dp/epsilon_spent": epsilon,
        "server/dp/delta": setup.delta,
        "server/dp/sampling_probability": setup.sampling_probability,
        "server/dp/target_epsilon": plan.aggregation.dp_target_epsilon,
    }
    if allowed is not None:
        metrics["server/dp/rounds_within_budget"] = float(allowed)
    exhausted = allowed is not None and rounds_done >= allowed
    return RoundBudget(epsilon=epsilon, exhausted=exhausted, metrics=metrics)
