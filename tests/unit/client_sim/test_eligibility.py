"""Device-side eligibility: ODP's min-separation and data-availability rules."""

import pytest

from client_sim import eligibility
from client_sim.history import ContributionHistory
from fcp_server.protos import common_pb2


def _info(current=None, separation=None, min_examples=None):
    info = common_pb2.EligibilityTaskInfo()
    if current is not None:
        info.eligibility_policies.add(
            id="minsep",
            min_sep_policy=common_pb2.MinimumSeparationPolicy(
                current_index=current, minimum_separation=separation
            ),
        )
    if min_examples is not None:
        info.eligibility_policies.add(
            id="data",
            data_availability_policy=common_pb2.DataAvailabilityPolicy(
                min_example_count=min_examples
            ),
        )
    return info


def _decide(info, history, count=100):
    return eligibility.evaluate(
        info, population="p", task_id="1", history=history, example_count=count
    )


def test_no_history_is_eligible_whatever_the_separation():
    assert _decide(_info(current=1, separation=50), ContributionHistory()).eligible


@pytest.mark.parametrize(
    ("last", "current", "sep", "ok"),
    [(3, 5, 2, True), (3, 4, 2, False), (5, 5, 0, True), (5, 5, 1, False)],
)
def test_min_separation_rule(last, current, sep, ok):
    history = ContributionHistory()
    history.record("p", "1", last)
    assert _decide(_info(current=current, separation=sep), history).eligible is ok


def test_history_is_per_task():
    history = ContributionHistory()
    history.record("p", "2", 5)
    assert _decide(_info(current=5, separation=3), history).eligible


def test_too_few_examples_is_not_eligible():
    decision = _decide(_info(min_examples=10), ContributionHistory(), count=9)
    assert not decision.eligible
    assert "9 examples < 10" in decision.reason
    assert _decide(_info(min_examples=10), ContributionHistory(), count=10).eligible


def test_unknown_policy_kind_raises():
    info = common_pb2.EligibilityTaskInfo()
    info.eligibility_policies.add(id="mystery")
    with pytest.raises(ValueError, match="mystery"):
        _decide(info, ContributionHistory())
