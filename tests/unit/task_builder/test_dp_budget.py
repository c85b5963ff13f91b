"""DP accounting: epsilon equals dp_accounting's, calibration hits the target, rejection."""

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from google.protobuf import text_format

from fcp_server.protos import task_builder_pb2
from task_builder import dp_budget, task_config
from task_builder.errors import DpBudgetError

# scipy 1.9 (pinned by TFF) calls a numpy 1.25-deprecated function inside dp_accounting.
pytestmark = pytest.mark.filterwarnings(
    "ignore:np.find_common_type is deprecated:DeprecationWarning"
)

DP = task_builder_pb2.DpAggregator
GAUSSIAN_TYPES = [DP.FIXED_GAUSSIAN, DP.ADAPTIVE_GAUSSIAN]
TREE_TYPES = [DP.TREE_AGGREGATION, DP.ADAPTIVE_TREE]


def direct_pld_epsilon(z: float, goal: int, population: int, rounds: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(goal / population, dp_accounting.GaussianDpEvent(z)),
        rounds,
    )
    accountant = pld.PLDAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def direct_tree_epsilon(z: float, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    )
    accountant.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, [rounds]))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("dp_type", GAUSSIAN_TYPES)
@pytest.mark.parametrize(
    ("z", "goal", "population", "rounds"),
    [(1.0, 100, 10_000, 50), (0.9, 20, 1_000, 30), (2.0, 500, 3_000_000, 100)],
)
def test_gaussian_epsilon_equals_pld_of_poisson_sampled_gaussian(
    dp_type, z, goal, population, rounds
):
    delta = 1e-6

    eps = dp_budget.compute_epsilon(dp_type, z, goal, population, rounds, delta)

    assert eps == direct_pld_epsilon(z, goal, population, rounds, delta)
    assert dp_budget.accountant_name(dp_type) == "PLD"


@pytest.mark.parametrize("dp_type", TREE_TYPES)
@pytest.mark.parametrize(("z", "rounds"), [(1.0, 100), (5.0, 1000)])
def test_tree_epsilon_equals_rdp_replace_special_single_epoch_tree(dp_type, z, rounds):
    delta = 1e-5

    # report_goal and population size do not enter the tree bound.
    eps = dp_budget.compute_epsilon(dp_type, z, 10, 100, rounds, delta)

    assert eps == direct_tree_epsilon(z, rounds, delta)
    assert dp_budget.accountant_name(dp_type) == "RDP"


def test_known_value_from_the_reference_facts():
    # tff-dp-flex-facts 3.5: tree, z=5, T=1000, delta=1e-5 -> epsilon 2.81.
    eps = dp_budget.compute_epsilon(DP.TREE_AGGREGATION, 5.0, 1, 1, 1000, 1e-5)

    assert eps == pytest.approx(2.81, abs=0.01)


@pytest.mark.parametrize("dp_type", GAUSSIAN_TYPES + TREE_TYPES)
def test_more_noise_spends_less_epsilon(dp_type):
    args = (50, 5_000, 40, 1e-6)

    eps = [dp_budget.compute_epsilon(dp_type, z, *args) for z in (0.8, 1.2, 2.0, 4.0)]

    assert eps == sorted(eps, reverse=True)
    assert eps[0] > eps[-1]


def test_zero_noise_is_infinite_epsilon():
    assert dp_budget.compute_epsilon(DP.FIXED_GAUSSIAN, 0.0, 10, 100, 5, 1e-5) == math.inf


@pytest.mark.parametrize(("goal", "population", "rounds"), [(0, 10, 1), (11, 10, 1), (1, 10, 0)])
def test_bad_accounting_arguments(goal, population, rounds):
    with pytest.raises(ValueError):
        dp_budget.make_dp_event(DP.FIXED_GAUSSIAN, 1.0, goal, population, rounds)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "goal", "population", "rounds", "delta"),
    [(2.0, 20, 1_000, 20, 1e-7), (1.0, 100, 10_000, 30, 1e-5)],
)
def test_gaussian_calibration_hits_target_within_one_percent(
    target, goal, population, rounds, delta
):
    z = dp_budget.calibrate_noise_multiplier(
        DP.FIXED_GAUSSIAN, target, goal, population, rounds, delta
    )

    eps = direct_pld_epsilon(z, goal, population, rounds, delta)
    assert 0.99 * target <= eps <= target


@pytest.mark.parametrize("dp_type", TREE_TYPES)
@pytest.mark.parametrize(("target", "rounds"), [(10.0, 1000), (2.0, 100)])
def test_tree_calibration_hits_target_within_one_percent(dp_type, target, rounds):
    delta = 1 / 3e6

    z = dp_budget.calibrate_noise_multiplier(dp_type, target, 10, 100, rounds, delta)

    eps = direct_tree_epsilon(z, rounds, delta)
    assert 0.99 * target <= eps <= target


def test_reference_tree_calibration_value():
    # tff-dp-flex-facts 3.5: ODP calibration for eps=10, delta=1/3e6, T=1000 -> z ~ 1.860.
    z = dp_budget.calibrate_noise_multiplier(DP.TREE_AGGREGATION, 10.0, 1, 1, 1000, 1 / 3e6)

    assert z == pytest.approx(1.860, abs=0.001)


def make_config(dp_text: str, *, rounds: int = 20, goal: int = 20, eps: float = 1.0):
    text = f"""
      mode: TRAINING_ONLY population_name: "p"
      policies {{ model_release_policy {{ num_max_training_rounds: {rounds}
                  dp_target_epsilon: {eps} dp_delta: 1e-7 }} }}
      federated_learning {{ learning_process {{ runtime_config {{ report_goal: {goal} }} }} }}
      differential_privacy {{ {dp_text} }}
    """
    config = text_format.Parse(text, task_builder_pb2.TaskConfig())
    return task_config.validate_and_normalize(config)


def test_explicit_noise_under_budget_passes_and_reports_epsilon():
    config = make_config("clip_norm: 1 noise_multiplier: 1.5 population_size: 1000")

    result = dp_budget.check_dp_budget(config, skip_dp_check=False, skip_dp_aggregator=False)

    expected = direct_pld_epsilon(1.5, 20, 1000, 20, 1e-7)
    assert result.epsilon == expected < 1.0
    assert (result.noise_multiplier, result.clip_norm, result.rounds) == (1.5, 1.0, 20)
    assert (result.accountant, result.population_size) == ("PLD", 1000)
    assert result.sampling_probability == pytest.approx(0.02)
    assert not result.noise_calibrated


def test_explicit_noise_over_budget_is_rejected_with_the_epsilon():
    config = make_config("clip_norm: 1 noise_multiplier: 0.8 population_size: 1000")
    eps = direct_pld_epsilon(0.8, 20, 1000, 20, 1e-7)

    with pytest.raises(DpBudgetError) as info:
        dp_budget.check_dp_budget(config, skip_dp_check=False, skip_dp_aggregator=False)

    message = str(info.value)
    assert message.startswith(
        "[Invalid task config]: differential_privacy setup is not private enough to pass DP "
        "accounting check"
    )
    assert (
        f"epsilon {eps:.6g} exceeds dp_target_epsilon 1 at delta 1e-07 after 20 rounds" in message
    )


def test_skip_dp_check_skips_only_the_rejection():
    config = make_config("clip_norm: 1 noise_multiplier: 0.8 population_size: 1000")

    result = dp_budget.check_dp_budget(config, skip_dp_check=True, skip_dp_aggregator=False)

    assert result.epsilon == direct_pld_epsilon(0.8, 20, 1000, 20, 1e-7) > 1.0


@pytest.mark.slow
def test_unset_noise_is_calibrated_to_the_target():
    config = make_config("clip_norm: 1 population_size: 1000")

    result = dp_budget.check_dp_budget(config, skip_dp_check=False, skip_dp_aggregator=False)

    assert result.noise_calibrated
    assert 0.99 * 1.0 <= result.epsilon <= 1.0
    assert result.epsilon == direct_pld_epsilon(result.noise_multiplier, 20, 1000, 20, 1e-7)


def test_without_dp_aggregator_epsilon_is_infinite_and_rejected_unless_skipped():
    config = make_config("clip_norm: 1 noise_multiplier: 1.0 population_size: 1000")

    with pytest.raises(DpBudgetError, match="no DP aggregator"):
        dp_budget.check_dp_budget(config, skip_dp_check=False, skip_dp_aggregator=True)
    result = dp_budget.check_dp_budget(config, skip_dp_check=True, skip_dp_aggregator=True)

    assert (result.epsilon, result.accountant) == (math.inf, "NONE")


def test_adaptive_noise_must_stay_below_twice_the_clipped_count_stddev():
    # clipped_count_stddev defaults to report_goal / 20 = 1, so z must be < 2.
    config = make_config("type: ADAPTIVE_GAUSSIAN noise_multiplier: 2.5 population_size: 1000")

    with pytest.raises(DpBudgetError) as info:
        dp_budget.check_dp_budget(config, skip_dp_check=True, skip_dp_aggregator=False)

    assert str(info.value) == (
        "[Invalid task config]: key `noise_multiplier` has a bad value: `2.5` in "
        "`differential_privacy`. Adaptive clipping needs noise_multiplier < "
        "2 * clipped_count_stddev = 2; raise report_goal or clipped_count_stddev."
    )


def test_adaptive_reports_init_clip_norm_and_tree_uses_rdp():
    adaptive = make_config("type: ADAPTIVE_GAUSSIAN noise_multiplier: 1.0 population_size: 1000")
    tree = make_config("type: TREE_AGGREGATION clip_norm: 2 noise_multiplier: 5", rounds=100)

    a = dp_budget.check_dp_budget(adaptive, skip_dp_check=True, skip_dp_aggregator=False)
    t = dp_budget.check_dp_budget(tree, skip_dp_check=True, skip_dp_aggregator=False)

    assert a.clip_norm == pytest.approx(0.1)
    assert (t.accountant, t.clip_norm) == ("RDP", 2.0)
    assert t.epsilon == direct_tree_epsilon(5.0, 100, 1e-7)
