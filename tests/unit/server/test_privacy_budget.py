import math

import pytest

from fcp_server.protos import plan_pb2, task_builder_pb2
from fcp_server.services import privacy_budget

Dp = task_builder_pb2.DpAggregator


def _spec(**kw):
    return plan_pb2.AggregationSpec(**kw)


def test_matches_the_reference_worked_example():
    # tff-dp-flex-facts.md 3.4 A: N=10,000, m=100, T=500, delta=1e-5, z=0.8 -> PLD eps 2.399.
    spec = _spec(
        dp_type=Dp.FIXED_GAUSSIAN,
        noise_multiplier=0.8,
        population_size=10_000,
        clients_per_round=100,
        dp_delta=1e-5,
    )
    assert privacy_budget.epsilon_after(spec, 100, 500) == pytest.approx(2.399, abs=0.01)


def test_odp_defaults_for_population_and_delta():
    spec = _spec(dp_type=Dp.FIXED_GAUSSIAN, noise_multiplier=1.0, clients_per_round=100)
    assert privacy_budget.delta(spec) == pytest.approx(1 / 3e6)
    assert privacy_budget.sampling_probability(spec, 100) == pytest.approx(100 / 3e6)
    # Section 3.4 B: N=3e6, m=100, z=1, T=1000 -> PLD 0.0062.
    assert privacy_budget.epsilon_after(spec, 100, 1000) == pytest.approx(0.0062, abs=0.0005)


def test_no_dp_zero_noise_and_zero_rounds():
    assert privacy_budget.epsilon_after(_spec(), 10, 5) is None
    assert privacy_budget.epsilon_after(_spec(dp_type=Dp.FIXED_GAUSSIAN), 10, 5) == math.inf
    assert (
        privacy_budget.epsilon_after(_spec(dp_type=Dp.FIXED_GAUSSIAN, noise_multiplier=1.0), 10, 0)
        == 0.0
    )
    with pytest.raises(ValueError):
        privacy_budget.epsilon_after(_spec(dp_type=Dp.FIXED_GAUSSIAN), 10, -1)


def test_budget_stop_is_monotone_in_rounds():
    spec = _spec(
        dp_type=Dp.FIXED_GAUSSIAN,
        noise_multiplier=1.0,
        population_size=20,
        clients_per_round=2,
        dp_delta=1e-5,
        dp_target_epsilon=1.8,
    )
    spent = [privacy_budget.epsilon_after(spec, 2, r) for r in (1, 2, 3)]
    assert spent == sorted(spent)
    assert spent[0] < 1.8 < spent[1]
    assert not privacy_budget.next_round_exceeds_budget(spec, 2, 0)
    assert privacy_budget.next_round_exceeds_budget(spec, 2, 1)
    no_target = _spec(dp_type=Dp.FIXED_GAUSSIAN, noise_multiplier=1.0, clients_per_round=2)
    assert not privacy_budget.next_round_exceeds_budget(no_target, 2, 1000)


def test_tree_aggregation_uses_the_tree_event():
    spec = _spec(dp_type=Dp.TREE_AGGREGATION, noise_multiplier=5.0, dp_delta=1e-5)
    # Section 3.5: z=5, T=1000, delta=1e-5 -> 2.81.
    assert privacy_budget.epsilon_after(spec, 100, 1000) == pytest.approx(2.81, abs=0.02)
