import math
import threading

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fcp_server import accounting
from fcp_server.protos import plan_pb2, task_builder_pb2

DpType = task_builder_pb2.DpAggregator
# scipy 1.9 (pinned by TFF) calls a numpy 1.25-deprecated function inside dp_accounting's PLD.
pytestmark = pytest.mark.filterwarnings(
    "ignore:np.find_common_type is deprecated:DeprecationWarning"
)
# Fast settings: q = 1e-4 keeps the PLD accountant quick.
GAUSSIAN = accounting.DpSetup(DpType.FIXED_GAUSSIAN, 1.0, 10, 100_000, 1e-6)
TREE = accounting.DpSetup(DpType.TREE_AGGREGATION, 1.0, 100, 100_000, 1e-6)


def _pld_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    acc = pld.PLDAccountant()
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
        )
    )
    return float(acc.get_epsilon(delta))


def _tree_epsilon(z: float, rounds: int, delta: float) -> float:
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, [rounds]))
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("dp_type", [DpType.FIXED_GAUSSIAN, DpType.ADAPTIVE_GAUSSIAN])
def test_gaussian_epsilon_is_dp_accountings_pld_of_poisson_sampled_rounds(dp_type):
    setup = accounting.DpSetup(dp_type, 0.8, 10, 100_000, 1e-6)
    assert accounting.epsilon_spent(setup, 50) == _pld_epsilon(0.8, 1e-4, 50, 1e-6)
    assert accounting.accountant_name(dp_type) == "PLD"


@pytest.mark.parametrize("dp_type", [DpType.TREE_AGGREGATION, DpType.ADAPTIVE_TREE])
def test_tree_epsilon_is_dp_accountings_rdp_tree_event(dp_type):
    setup = accounting.DpSetup(dp_type, 1.3, 100, 100_000, 1e-6)
    assert accounting.epsilon_spent(setup, 300) == _tree_epsilon(1.3, 300, 1e-6)
    # The sampling rate does not enter the tree bound.
    other = accounting.DpSetup(dp_type, 1.3, 5, 100_000, 1e-6)
    assert accounting.epsilon_spent(other, 300) == accounting.epsilon_spent(setup, 300)
    assert accounting.accountant_name(dp_type) == "RDP"


def test_zero_rounds_spend_nothing_and_zero_noise_spends_everything():
    assert accounting.epsilon_spent(GAUSSIAN, 0) == 0.0
    assert accounting.epsilon_spent(TREE, 0) == 0.0
    assert isinstance(accounting.make_dp_event(GAUSSIAN, 0), dp_accounting.NoOpDpEvent)
    assert accounting.epsilon_spent(GAUSSIAN.with_noise(0.0), 3) == math.inf


def test_epsilon_grows_with_rounds():
    values = [accounting.epsilon_spent(GAUSSIAN, r) for r in (1, 10, 100, 1000)]
    assert values == sorted(values)
    assert values[0] < values[-1]


def test_plan_spec_uses_odps_defaults_for_unset_fields():
    spec = plan_pb2.AggregationSpec(noise_multiplier=1.0, clients_per_round=100)
    spec.dp_type = DpType.FIXED_GAUSSIAN
    expected = _pld_epsilon(1.0, 100 / 3_000_000, 20, 1 / 3_000_000)
    assert accounting.epsilon_after(spec, 20) == expected
    setup = accounting.DpSetup.from_spec(spec)
    assert setup.population_size == 3_000_000
    assert setup.delta == pytest.approx(1 / 3_000_000)
    assert accounting.epsilon_after(plan_pb2.AggregationSpec(), 20) is None


def test_clients_per_round_falls_back_to_the_report_goal():
    spec = plan_pb2.AggregationSpec(noise_multiplier=1.0, population_size=10_000)
    spec.dp_type = DpType.ADAPTIVE_GAUSSIAN
    assert accounting.DpSetup.from_spec(spec, report_goal=50).sampling_probability == 0.005
    with pytest.raises(ValueError, match="report_goal"):
        accounting.DpSetup.from_spec(spec)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dp_type": DpType.UNKNOWN}, "DP aggregator type"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"report_goal": 0}, "report_goal"),
        ({"report_goal": 200_000}, "report_goal"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
    ],
)
def test_invalid_setups_are_refused(kwargs, match):
    args = {
        "dp_type": DpType.FIXED_GAUSSIAN,
        "noise_multiplier": 1.0,
        "report_goal": 100,
        "population_size": 100_000,
        "delta": 1e-6,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        accounting.DpSetup(**args)


def test_round_counts_are_bounded():
    with pytest.raises(ValueError, match="rounds"):
        accounting.epsilon_spent(GAUSSIAN, -1)
    with pytest.raises(ValueError, match="rounds"):
        accounting.epsilon_spent(GAUSSIAN, accounting.MAX_ROUNDS + 1)


@pytest.mark.parametrize(("setup", "target"), [(GAUSSIAN, 0.01), (TREE, 12.0)])
def test_max_rounds_is_the_last_round_within_budget(setup, target):
    rounds = accounting.max_rounds_within_budget(setup, target, 2000)
    assert 0 < rounds < 2000
    assert accounting.epsilon_spent(setup, rounds) <= target
    assert accounting.epsilon_spent(setup, rounds + 1) > target


def test_max_rounds_edges():
    assert accounting.max_rounds_within_budget(GAUSSIAN, 100.0, 50) == 50
    assert accounting.max_rounds_within_budget(TREE, 1e-3, 50) == 0
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.max_rounds_within_budget(TREE, -1.0, 50)


def test_repeated_questions_are_served_from_the_cache():
    accounting.epsilon_spent(GAUSSIAN, 77)
    hits = accounting.epsilon_spent.cache_info().hits
    accounting.epsilon_spent(accounting.DpSetup(DpType.FIXED_GAUSSIAN, 1.0, 10, 100_000, 1e-6), 77)
    assert accounting.epsilon_spent.cache_info().hits == hits + 1


@pytest.mark.parametrize(
    ("setup", "target", "rounds"),
    [
        pytest.param(GAUSSIAN, 0.5, 200, marks=pytest.mark.slow),
        (TREE, 8.0, 100),
        (accounting.DpSetup(DpType.ADAPTIVE_TREE, 1.0, 10, 100_000, 1e-5), 3.0, 1000),
    ],
)
def test_calibrated_noise_lands_within_one_percent_below_the_target(setup, target, rounds):
    z = accounting.calibrate_noise(setup, target, rounds)
    epsilon = accounting.epsilon_spent(setup.with_noise(z), rounds)
    assert epsilon <= target
    assert epsilon == pytest.approx(target, rel=0.01)


def test_calibration_validates_its_inputs():
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.calibrate_noise(GAUSSIAN, 0.0, 10)
    with pytest.raises(ValueError, match="0 rounds"):
        accounting.calibrate_noise(GAUSSIAN, 1.0, 0)


def test_the_cached_one_round_pld_gives_the_accountants_answer_for_any_round_order():
    # q = 0.1 as in the demo, where building the one-round PLD dominates: it is built once
    # and reused; composing it must not change it (later, smaller round counts still match).
    setup = accounting.DpSetup(DpType.FIXED_GAUSSIAN, 0.8, 48, 480, 3.3e-7)
    accounting.epsilon_spent.cache_clear()
    for rounds in (20, 3):
        assert accounting.epsilon_spent(setup, rounds) == _pld_epsilon(0.8, 0.1, rounds, 3.3e-7)


@pytest.mark.parametrize("callers", [2, 3])
def test_concurrent_callers_build_one_pld(callers):
    setup = accounting.DpSetup(DpType.FIXED_GAUSSIAN, 1.0 + callers / 64, 5, 500, 1e-5)
    built = accounting._subsampled_gaussian_pld.cache_info().misses
    barrier = threading.Barrier(callers)
    results = []

    def ask():
        barrier.wait()
        results.append(accounting.epsilon_spent(setup, 7))

    threads = [threading.Thread(target=ask) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == callers and len(set(results)) == 1
    assert accounting._subsampled_gaussian_pld.cache_info().misses == built + 1
