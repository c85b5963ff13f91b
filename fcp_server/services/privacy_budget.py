"""Epsilon spent by a DP-FedAvg task after some rounds, and the stop-before-overspending check.

Uses Google's `dp_accounting` exactly as ODP's task builder (`dp_utils.py`; facts in
tff-dp-flex-facts.md section 3.3): the Gaussian aggregators compose
`PoissonSampledDpEvent(q = clients_per_round / population, GaussianDpEvent(z))` over the
rounds with the PLD accountant; the tree aggregators use
`SingleEpochTreeAggregationDpEvent(z, [rounds])` with the RDP accountant (REPLACE_SPECIAL).
An unset population is ODP's assumed 3,000,000 and an unset delta is 1/3,000,000. The
sampling assumption is optimistic for check-in based selection (see section 3.2's caveat);
the figure is what ODP reports, not a proof about this deployment.
"""

import functools
import math
import warnings

import dp_accounting
from dp_accounting import pld, rdp

from fcp_server.protos import plan_pb2, task_builder_pb2

DEFAULT_POPULATION = 3_000_000
DEFAULT_DELTA = 1.0 / DEFAULT_POPULATION
_DpType = task_builder_pb2.DpAggregator
_GAUSSIAN = (_DpType.FIXED_GAUSSIAN, _DpType.ADAPTIVE_GAUSSIAN)
_TREE = (_DpType.TREE_AGGREGATION, _DpType.ADAPTIVE_TREE)


def dp_enabled(spec: plan_pb2.AggregationSpec) -> bool:
    """Whether the plan aggregates with a DP aggregator."""
    return spec.dp_type != _DpType.UNKNOWN


def delta(spec: plan_pb2.AggregationSpec) -> float:
    """The plan's delta, or ODP's default."""
    return spec.dp_delta if spec.dp_delta > 0 else DEFAULT_DELTA


def sampling_probability(spec: plan_pb2.AggregationSpec, report_goal: int) -> float:
    """Q = clients per round / population (ODP's fixed assumed population when unset)."""
    per_round = spec.clients_per_round or report_goal
    population = spec.population_size or DEFAULT_POPULATION
    return min(1.0, per_round / population)


@functools.lru_cache(maxsize=256)
def _epsilon(dp_type: int, z: float, q: float, rounds: int, target_delta: float) -> float:
    if rounds <= 0:
        return 0.0
    if z <= 0:
        return math.inf
    if dp_type in _TREE:
        accountant: dp_accounting.PrivacyAccountant = rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL
        )
        event: dp_accounting.DpEvent = dp_accounting.SingleEpochTreeAggregationDpEvent(z, [rounds])
    else:
        accountant = pld.PLDAccountant()
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
        )
    with warnings.catch_warnings():
        # scipy 1.9 (pinned by TFF) calls a numpy 1.25-deprecated function inside the PLD
        # computation; the warning is about scipy's code, not about this accounting.
        warnings.filterwarnings("ignore", "np.find_common_type is deprecated", DeprecationWarning)
        accountant.compose(event)
        return float(accountant.get_epsilon(target_delta))


def epsilon_after(spec: plan_pb2.AggregationSpec, report_goal: int, rounds: int) -> float | None:
    """Epsilon spent after `rounds` rounds at the plan's delta; None when DP is off.

    Raises:
        ValueError: For an unknown DP aggregator type or a negative round count.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not dp_enabled(spec):
        return None
    if spec.dp_type not in _GAUSSIAN + _TREE:
        raise ValueError(f"unknown DP aggregator type {spec.dp_type}")
    q = sampling_probability(spec, report_goal)
    return _epsilon(int(spec.dp_type), spec.noise_multiplier, q, rounds, delta(spec))


def next_round_exceeds_budget(
    spec: plan_pb2.AggregationSpec, report_goal: int, completed_rounds: int
) -> bool:
    """True when one more round would spend more than `dp_target_epsilon` (0 = no target)."""
    if not dp_enabled(spec) or spec.dp_target_epsilon <= 0:
        return False
    spent = epsilon_after(spec, report_goal, completed_rounds + 1)
    return spent is not None and spent > spec.dp_target_epsilon
