import itertools
import math

import numpy as np
import pytest

from fcp_server.aggregation import tree_noise


def _weight(level: int) -> float:
    return 1.0 / (2.0 - 0.5**level)


def cumulative_variance(num_leaves: int, std: float) -> float:
    """Var of the prefix-sum noise over `num_leaves` leaves (one node per set bit).

    A node at level d has variance std^2 (2 - 0.5^d) (each merge halves the children and adds
    a fresh node) and weight 1 / (2 - 0.5^d), so it contributes std^2 / (2 - 0.5^d).
    """
    bits = [d for d in range(num_leaves.bit_length()) if num_leaves >> d & 1]
    return std**2 * sum(_weight(d) for d in bits)


def residual_variance(round_index: int, std: float) -> float:
    """Var of the per-round noise c_t - c_{t-1} of round t (0-based).

    Leaf t merges the L buffered nodes of levels 0..L-1 (L = trailing ones of t) into a node
    N = sum_i 0.5^(L-i) r_i + fresh noise at level L. Nodes above L cancel; what is left is
    w_L N - sum_i w_i r_i, whose variance is std^2 (w_L (2 * 0.5^L - 1) + sum_{i<L} w_i).
    """
    merged = 0
    while round_index >> merged & 1:
        merged += 1
    factor = _weight(merged) * (2.0 * 0.5**merged - 1.0) + sum(_weight(i) for i in range(merged))
    return std**2 * factor


SHAPES = [(50, 40), (1000,)]  # 3000 independent coordinates per node


def _grow(rounds: int, std: float, rng: np.random.Generator) -> list[tree_noise.TreeNoise]:
    trees = [tree_noise.TreeNoise()]
    for _ in range(rounds):
        trees.append(tree_noise.add_leaf(trees[-1], SHAPES, std, rng))
    return trees


def test_levels_follow_the_binary_representation_of_the_leaf_count():
    trees = _grow(11, 1.0, np.random.default_rng(0))
    for count, tree in enumerate(trees):
        assert tree.num_leaves() == count
        assert tree.levels == tuple(d for d in range(count.bit_length()) if count >> d & 1)


def test_zero_std_gives_zero_noise():
    trees = _grow(7, 0.0, np.random.default_rng(0))
    for tree in trees:
        for noise in tree_noise.cumulative_noise(tree, SHAPES):
            assert not noise.any()


def test_residual_variance_formula_sanity():
    # Hand-derived values: rounds 0, 1, 2 have variance std^2; round 3 has
    # std^2 (-0.5 / 1.75 + 1 + 1 / 1.5).
    assert residual_variance(0, 2.0) == pytest.approx(4.0)
    assert residual_variance(1, 2.0) == pytest.approx(4.0)
    assert residual_variance(2, 2.0) == pytest.approx(4.0)
    assert residual_variance(3, 1.0) == pytest.approx(-0.5 / 1.75 + 1 + 1 / 1.5)


def test_cumulative_and_per_round_noise_variances_match_the_efficient_tree_theory():
    std = 1.7
    rounds = 16
    # Statistical: repeat independent trees so each variance uses 3000 x 40 samples.
    repeats = 40
    cumulative = np.zeros((repeats, rounds + 1))
    residual = np.zeros((repeats, rounds))
    rng = np.random.default_rng(20240611)
    for r in range(repeats):
        trees = _grow(rounds, std, rng)
        sums = [
            np.concatenate([n.ravel() for n in tree_noise.cumulative_noise(t, SHAPES)])
            for t in trees
        ]
        cumulative[r] = [np.mean(s**2) for s in sums]
        residual[r] = [np.mean((b - a) ** 2) for a, b in itertools.pairwise(sums)]
    samples = repeats * 3000
    # A sample variance of n normals has relative standard error sqrt(2 / n); allow 5 of them.
    tolerance = 5 * math.sqrt(2 / samples)
    for t in range(1, rounds + 1):
        expected = cumulative_variance(t, std)
        assert cumulative[:, t].mean() == pytest.approx(expected, rel=tolerance)
    for t in range(rounds):
        assert residual[:, t].mean() == pytest.approx(residual_variance(t, std), rel=tolerance)


def test_state_round_trip_is_exact_and_empty_tree_has_no_arrays():
    trees = _grow(6, 1.0, np.random.default_rng(3))
    assert tree_noise.to_state(trees[0], "tree/") == {}
    assert tree_noise.from_state({}, "tree/") == tree_noise.TreeNoise()
    state = tree_noise.to_state(trees[6], "tree/")
    assert sorted(state) == ["tree/levels", "tree/noise/0", "tree/noise/1"]
    assert state["tree/noise/0"].shape == (2, 50, 40)
    assert state["tree/noise/0"].dtype == np.float32
    back = tree_noise.from_state(state, "tree/")
    assert back.levels == (1, 2)
    for a, b in zip(back.nodes, trees[6].nodes, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s.pop("tree/levels"), "without"),
        (lambda s: s.update({"tree/levels": np.array([2, 1], np.int64)}), "not a valid tree"),
        (lambda s: s.update({"tree/levels": np.array([1, 99], np.int64)}), "not a valid tree"),
        (lambda s: s.update({"tree/levels": np.array([1.0, 2.0])}), "int64"),
        (lambda s: s.pop("tree/noise/0"), "misnumbered"),
        (lambda s: s.update({"tree/noise/x": np.zeros(2, np.float32)}), "noise/<i>"),
        (lambda s: s.update({"tree/noise/1": np.zeros((3, 1000), np.float32)}), "rows"),
        (lambda s: s.update({"tree/noise/1": np.zeros((2, 1000), np.float64)}), "float32"),
        (lambda s: s.update({"tree/noise/1": np.full((2, 1000), np.nan, np.float32)}), "NaN"),
    ],
)
def test_corrupt_tree_state_is_rejected(mutate, match):
    state = tree_noise.to_state(_grow(6, 1.0, np.random.default_rng(3))[6], "tree/")
    mutate(state)
    with pytest.raises(ValueError, match=match):
        tree_noise.from_state(state, "tree/")


def test_a_tree_for_another_model_is_rejected():
    tree = _grow(2, 1.0, np.random.default_rng(0))[2]
    with pytest.raises(ValueError, match="model has"):
        tree_noise.add_leaf(tree, [(3,)], 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="std"):
        tree_noise.add_leaf(tree, SHAPES, -1.0, np.random.default_rng(0))
