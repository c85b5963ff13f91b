"""Evaluates a task assignment's eligibility policies on the device (ODP EligibilityDecider).

The server sends `EligibilityTaskInfo` with the check-in answer and leaves the decision to the
device, which reports NOT_ELIGIBLE when any policy fails:
  * MinimumSeparationPolicy: eligible iff the device never contributed to the task, or
    `minimum_separation <= current_index - last_contributed_round` (ODP's current rule);
  * DataAvailabilityPolicy: eligible iff the device holds >= `min_example_count` examples.
Unknown policy kinds are an error, as in the reference.
"""

from dataclasses import dataclass

from client_sim.history import ContributionHistory
from fcp_server.protos import common_pb2


@dataclass(frozen=True)
class Decision:
    """The outcome of evaluating all policies."""

    # True when every policy passed.
    eligible: bool
    # Which policy failed and why (empty when eligible).
    reason: str = ""


def min_separation_ok(policy: common_pb2.MinimumSeparationPolicy, last_round: int | None) -> bool:
    """True iff no history or minimum_separation <= current_index - last_round."""
    if last_round is None:
        return True
    return policy.minimum_separation <= policy.current_index - last_round


def data_availability_ok(policy: common_pb2.DataAvailabilityPolicy, example_count: int) -> bool:
    """True iff the device has at least min_example_count examples."""
    return example_count >= policy.min_example_count


def evaluate(
    info: common_pb2.EligibilityTaskInfo,
    *,
    population: str,
    task_id: str,
    history: ContributionHistory,
    example_count: int,
) -> Decision:
    """Evaluates every policy of a task assignment for one device.

    Raises:
      ValueError: for a policy with no known kind.
    """
    for spec in info.eligibility_policies:
        kind = spec.WhichOneof("policy_type")
        if kind == "min_sep_policy":
            last = history.last_round(population, task_id)
            if not min_separation_ok(spec.min_sep_policy, last):
                return Decision(
                    False,
                    f"min separation {spec.min_sep_policy.minimum_separation}: last round "
                    f"{last}, current {spec.min_sep_policy.current_index}",
                )
        elif kind == "data_availability_policy":
            if not data_availability_ok(spec.data_availability_policy, example_count):
                return Decision(
                    False,
                    f"{example_count} examples < "
                    f"{spec.data_availability_policy.min_example_count} required",
                )
        else:
            raise ValueError(f"unknown eligibility policy {spec.id!r} (kind {kind})")
    return Decision(True)
