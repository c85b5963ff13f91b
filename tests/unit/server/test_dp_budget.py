import math

import pytest

from fcp_server.protos import plan_pb2, task_builder_pb2
from fcp_server.services import dp_budget

Dp = task_builder_pb2.DpAggregator


def _plan(num_rounds=0, report_goal=2, **aggregation):
    return plan_pb2.ServerPlan(
        num_rounds=num_rounds,
        report_goal=report_goal,
        aggregation=plan_pb2.AggregationSpec(**aggregation),
    )


def _small_population(**kw):
    # q = 2/20, z = 1: epsilon(1) = 1.685, epsilon(2) = 1.917 at delta 1e-5 (PLD).
    args = {
        "dp_type": Dp.FIXED_GAUSSIAN,
        "noise_multiplier": 1.0,
        "population_size": 20,
        "clients_per_round": 2,
        "dp_delta": 1e-5,
    }
    args.update(kw)
    return args


def test_matches_the_reference_worked_example():
    # tff-dp-flex-facts.md 3.4 A: N=10,000, m=100, T=500, delta=1e-5, z=0.8 -> PLD eps 2.399.
    plan = _plan(
        report_goal=100,
        dp_type=Dp.FIXED_GAUSSIAN,
        noise_multiplier=0.8,
        population_size=10_000,
        clients_per_round=100,
        dp_delta=1e-5,
    )
    budget = dp_budget.after_rounds(plan, total_iteration=500, rounds_done=500)
    assert budget.epsilon == pytest.approx(2.399, abs=0.01)
    assert budget.metrics["server/dp/sampling_probability"] == pytest.approx(0.01)
    assert not budget.exhausted  # no target epsilon


def test_odp_defaults_for_population_and_delta():
    plan = _plan(report_goal=100, dp_type=Dp.FIXED_GAUSSIAN, noise_multiplier=1.0)
    budget = dp_budget.after_rounds(plan, total_iteration=1000, rounds_done=1000)
    assert budget.metrics["server/dp/delta"] == pytest.approx(1 / 3e6)
    assert budget.metrics["server/dp/sampling_probability"] == pytest.approx(100 / 3e6)
    # Section 3.4 B: N=3e6, m=100, z=1, T=1000 -> PLD 0.0062.
    assert budget.epsilon == pytest.approx(0.0062, abs=0.0005)


def test_tree_types_use_the_tree_event():
    for dp_type in (Dp.TREE_AGGREGATION, Dp.ADAPTIVE_TREE):
        plan = _plan(report_goal=100, dp_type=dp_type, noise_multiplier=5.0, dp_delta=1e-5)
        # Section 3.5: z=5, T=1000, delta=1e-5 -> 2.81 (RDP, REPLACE_SPECIAL).
        budget = dp_budget.after_rounds(plan, total_iteration=1000, rounds_done=1000)
        assert budget.epsilon == pytest.approx(2.81, abs=0.02)


def test_no_dp_zero_noise_and_zero_rounds():
    assert dp_budget.after_rounds(_plan(), 5, 5) == dp_budget.RoundBudget(None, False, {})
    assert dp_budget.rounds_within_budget(_plan(), 5) is None
    no_noise = _plan(dp_type=Dp.FIXED_GAUSSIAN, clients_per_round=2)
    assert dp_budget.after_rounds(no_noise, 5, 1).epsilon == math.inf
    assert dp_budget.after_rounds(_plan(**_small_population()), 5, 0).epsilon == 0.0
    with pytest.raises(ValueError):
        dp_budget.after_rounds(_plan(**_small_population()), 5, -1)


def test_budget_stops_before_the_round_that_overspends():
    plan = _plan(num_rounds=3, **_small_population(dp_target_epsilon=1.8))
    assert dp_budget.rounds_within_budget(plan, 3) == 1
    first, second = (dp_budget.after_rounds(plan, 3, r) for r in (1, 2))
    assert first.epsilon < 1.8 < second.epsilon
    assert first.exhausted
    assert first.metrics["server/dp/rounds_within_budget"] == 1.0
    assert not dp_budget.after_rounds(plan, 3, 0).exhausted
    # A target one round already overspends allows no round.
    assert dp_budget.rounds_within_budget(_plan(**_small_population(dp_target_epsilon=1.0)), 2) == 0


def test_search_is_bounded_by_the_planned_rounds():
    # q = 100 / 3e6 (ODP's default population): cheap to account, tiny epsilon per round.
    generous = _plan(
        num_rounds=3,
        report_goal=100,
        dp_type=Dp.FIXED_GAUSSIAN,
        noise_multiplier=1.0,
        clients_per_round=100,
        dp_target_epsilon=0.001,
    )
    assert dp_budget.epsilon_after(generous, 4) < 0.001  # more than 3 rounds would fit
    assert dp_budget.rounds_within_budget(generous, total_iteration=3) == 3
    # All planned rounds fit: never reported as exhausted before the task's last round.
    assert not dp_budget.after_rounds(generous, 3, 2).exhausted
    # An unset or smaller num_rounds falls back to the task's total_iteration.
    assert dp_budget.planned_rounds(_plan(num_rounds=0), 7) == 7
    assert dp_budget.planned_rounds(_plan(num_rounds=9), 7) == 9
