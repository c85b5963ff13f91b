"""pld_composition gives dp_accounting 0.4.3's PLD numbers bit for bit."""

import functools
import math

import numpy as np
import pytest
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from fcp_server import accounting, pld_composition

# scipy 1.9 (pinned by TFF) calls a numpy 1.25-deprecated function inside dp_accounting's PLD.
pytestmark = pytest.mark.filterwarnings(
    "ignore:np.find_common_type is deprecated:DeprecationWarning"
)
GRID = 1e-4


@functools.lru_cache(maxsize=8)
def _step(z: float, q: float) -> pld_lib.PrivacyLossDistribution:
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=z, value_discretization_interval=GRID, sampling_prob=q
    )


def _ours(pmf: pld_pmf.DensePLDPmf) -> pld_composition.DensePmf:
    return pld_composition.DensePmf(pmf._lower_loss, pmf._probs.copy(), pmf._infinity_mass)


def _theirs(pmf: pld_composition.DensePmf) -> pld_pmf.DensePLDPmf:
    return pld_pmf.DensePLDPmf(GRID, pmf.lower_loss, pmf.probs.copy(), pmf.infinity_mass, True)


def _assert_same(ours: pld_composition.DensePmf, theirs: pld_pmf.DensePLDPmf) -> None:
    assert ours.lower_loss == theirs._lower_loss
    assert ours.infinity_mass == theirs._infinity_mass
    np.testing.assert_array_equal(ours.probs, theirs._probs)


STEPS = [(0.5, 0.01), (0.8, 0.1), (2.0, 0.1), (0.3, 0.005)]


@pytest.mark.parametrize(("z", "q"), STEPS)
@pytest.mark.parametrize("rounds", [1, 2, 7, 40])
def test_self_composition_and_identity_compose_match_dp_accounting(z, q, rounds):
    step = _step(z, q)
    for theirs in (step._pmf_remove, step._pmf_add):
        mine = pld_composition.StepPmf.of(_ours(theirs))
        composed = pld_composition.self_compose(mine, rounds)
        _assert_same(composed, theirs.self_compose(rounds))
        identity = pld_lib.identity(GRID)._pmf_remove.to_dense_pmf()
        expected = identity.compose(theirs.self_compose(rounds), 1e-15)
        _assert_same(pld_composition.compose(_ours(identity), composed), expected)


@pytest.mark.parametrize("tail_mass", [0.0, 1e-15, 1e-3, 0.5, 0.99])
def test_compose_truncates_tails_like_dp_accounting(tail_mass):
    rng = np.random.default_rng(7)
    for _ in range(20):
        a = rng.exponential(size=rng.integers(1, 300)) ** 6
        b = rng.exponential(size=rng.integers(1, 300)) ** 6
        a, b = a / a.sum(), b / b.sum()
        first = pld_composition.DensePmf(int(rng.integers(-50, 50)), a, float(rng.uniform(0, 1e-3)))
        second = pld_composition.DensePmf(int(rng.integers(-50, 50)), b, 0.0)
        expected = _theirs(first).compose(_theirs(second), tail_mass)
        _assert_same(pld_composition.compose(first, second, tail_mass), expected)


def _random_pmf(rng: np.random.Generator, n: int, lower: int) -> pld_composition.DensePmf:
    probs = rng.exponential(size=n) ** rng.uniform(1, 8)
    probs[rng.random(n) < 0.2] = 0.0
    probs /= probs.sum() * rng.uniform(1.0, 1.01)
    return pld_composition.DensePmf(lower, probs, float(rng.choice([0.0, 1e-9, 1e-5])))


def test_epsilon_matches_dp_accounting_on_random_pmfs():
    rng = np.random.default_rng(11)
    for _ in range(300):
        n = int(rng.integers(1, 3000))
        pmf = _random_pmf(rng, n, int(rng.integers(-n - 500, 500)))
        grid = float(rng.choice([1e-4, 1e-3, 1e-2]))
        delta = float(10 ** rng.uniform(-9, -0.5))
        theirs = pld_pmf.DensePLDPmf(
            grid, pmf.lower_loss, pmf.probs.copy(), pmf.infinity_mass, True
        )
        assert pld_composition.epsilon_for_delta(pmf, grid, delta) == float(
            theirs.get_epsilon_for_delta(delta)
        )


@pytest.mark.parametrize(("z", "q"), STEPS)
@pytest.mark.parametrize("delta", [1e-9, 3.3e-7, 1e-3, 0.3])
def test_epsilon_of_composed_pmfs_matches_dp_accounting(z, q, delta):
    step = _step(z, q)
    for theirs in (step._pmf_remove, step._pmf_add):
        composed = theirs.self_compose(5)
        assert pld_composition.epsilon_for_delta(_ours(composed), GRID, delta) == float(
            composed.get_epsilon_for_delta(delta)
        )


def test_epsilon_edge_cases_match_dp_accounting():
    cases = [
        # Infinite loss heavier than delta: no finite epsilon.
        (pld_composition.DensePmf(0, np.array([0.5, 0.3]), 0.2), 0.1),
        # Losses past ~745 / grid underflow exp(-loss) to 0: the walk returns at a loss.
        (pld_composition.DensePmf(80_000, np.full(100, 0.01), 0.0), 1e-3),
        (pld_composition.DensePmf(80_000, np.full(100, 0.01), 0.0), 0.5),
        # Every loss below zero: the walk runs out and epsilon is 0.
        (pld_composition.DensePmf(-500, np.full(100, 0.01), 0.0), 1e-6),
        # One grid point.
        (pld_composition.DensePmf(3, np.array([1.0]), 0.0), 1e-6),
        (pld_composition.DensePmf(-3, np.array([1.0]), 1e-7), 1e-6),
    ]
    for pmf, delta in cases:
        theirs = pld_pmf.DensePLDPmf(
            0.01, pmf.lower_loss, pmf.probs.copy(), pmf.infinity_mass, True
        )
        assert pld_composition.epsilon_for_delta(pmf, 0.01, delta) == float(
            theirs.get_epsilon_for_delta(delta)
        )
    assert math.isinf(pld_composition.epsilon_for_delta(cases[0][0], 0.01, 0.1))


def test_self_compose_refuses_zero_rounds():
    step = pld_composition.StepPmf.of(pld_composition.DensePmf(0, np.array([1.0]), 0.0))
    with pytest.raises(ValueError, match="num_times"):
        pld_composition.self_compose(step, 0)


@pytest.mark.parametrize(
    ("z", "report_goal", "population", "rounds"),
    [
        (0.5, 10, 1000, 5),  # benchmark B7's task
        (1.1, 100, 100, 3),  # q = 1: a symmetric PLD (one PMF)
        (60.0, 1, 100_000, 4),  # a tiny PMF that dp_accounting keeps sparse
    ],
)
def test_accounting_matches_the_pld_accountant_on_both_paths(z, report_goal, population, rounds):
    setup = accounting.DpSetup(accounting._DpType.FIXED_GAUSSIAN, z, report_goal, population, 1e-6)
    accountant = accounting.make_accountant(setup.dp_type)
    accountant.compose(accounting.make_dp_event(setup, rounds))
    assert accounting._pld_epsilon_spent(setup, rounds) == float(accountant.get_epsilon(1e-6))


def test_the_exact_search_decides_near_ties_with_math_log():
    upper, lower, delta = np.full(3, 0.9), np.full(3, 0.3), 0.1
    tie = math.log((0.9 - 0.1) / 0.3)
    above = math.nextafter(tie, math.inf)
    stop = pld_composition._first_stop
    assert stop(upper, lower, np.array([above, above, tie]), delta, exact=True) == 2
    assert stop(upper, lower, np.array([above, above, above]), delta, exact=True) is None
    assert stop(upper, lower, np.array([above, tie - 1.0, tie]), delta, exact=True) == 1
