"""Tree-aggregated Gaussian noise for DP-FTRL: the "efficient" binary tree of Honaker (2015).

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep) Learning without
Sampling or Shuffling" (ICML 2021, arXiv 2103.00039) privatise the *cumulative* sum of the
round aggregates with a binary tree of Gaussian nodes; each round releases the difference of
two consecutive noised prefix sums. This module is TF-Privacy 0.9.0's `EfficientTreeAggregator`
(Honaker, "Efficient Use of Differentially Private Binary Trees", 2015) in numpy:

* the buffer holds, lowest level first, the root of every complete subtree covering the leaves
  so far (the set bits of the leaf count);
* a new leaf is `N(0, std^2)`; while a subtree of the same level is buffered the two merge into
  `0.5 * (left + right) + N(0, std^2)` one level up;
* the noise of the prefix sum is `sum_j node_j / (2 - 0.5^level_j)`.

Unlike TF-Privacy, which draws the next leaf when a round ends, a leaf is drawn when its round
is aggregated: the draws are the same sequence, but a checkpoint never holds noise that was not
yet used, and every round's fresh noise comes from that round's generator. Nodes are stored in
float32, as TF-Privacy's buffers, so the state costs O(log T x model) and survives a checkpoint
round trip bit for bit.
"""

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from fcp_server.aggregation.state import Tensor, Tensors

# 2^62 leaves is far beyond any run; bounds what a (possibly corrupted) checkpoint may claim.
MAX_LEVEL = 62
_LEVELS = "levels"
_NOISE = "noise/"


@dataclasses.dataclass(frozen=True)
class TreeNoise:
    """The buffered subtree roots of a tree (empty before the first leaf or after a restart)."""

    # Level of each buffered node, strictly increasing (buffer position 0 is the lowest).
    levels: tuple[int, ...] = ()
    # One node per level: one float32 array per tensor of the record.
    nodes: tuple[Tensors, ...] = ()

    def num_leaves(self) -> int:
        """Returns how many leaves (rounds) the tree covers."""
        return sum(1 << level for level in self.levels)


def _draw(shapes: Sequence[tuple[int, ...]], std: float, rng: np.random.Generator) -> Tensors:
    return tuple(rng.normal(loc=0.0, scale=std, size=shape) for shape in shapes)


def add_leaf(
    tree: TreeNoise, shapes: Sequence[tuple[int, ...]], std: float, rng: np.random.Generator
) -> TreeNoise:
    """Returns the tree after one more leaf, merging complete subtrees (Honaker's update).

    Args:
        tree: The current tree.
        shapes: Shapes of the record's tensors (the noise has one array per tensor).
        std: Standard deviation of every node's fresh Gaussian noise, >= 0.
        rng: Source of the fresh noise.

    Raises:
        ValueError: If `std` is negative, the tree's nodes do not have `shapes`, or it is full.
    """
    if not std >= 0.0:
        raise ValueError(f"Tree node noise std must be >= 0, found {std}.")
    check_shapes(tree, shapes)
    new: Tensors = _draw(shapes, std, rng)
    level = 0
    while level < len(tree.levels) and tree.levels[level] == level:
        fresh = _draw(shapes, std, rng)
        new = tuple(
            0.5 * (left.astype(np.float64) + right) + noise
            for left, right, noise in zip(tree.nodes[level], new, fresh, strict=True)
        )
        level += 1
    if level > MAX_LEVEL:
        raise ValueError(f"The noise tree is full ({MAX_LEVEL} levels).")
    stored = tuple(t.astype(np.float32) for t in new)
    return TreeNoise((level, *tree.levels[level:]), (stored, *tree.nodes[level:]))


def cumulative_noise(tree: TreeNoise, shapes: Sequence[tuple[int, ...]]) -> Tensors:
    """Returns the noise of the prefix sum over all leaves: `sum_j node_j / (2 - 0.5^level_j)`.

    Args:
        tree: The tree (an empty tree gives zeros, as a fresh or restarted TF-Privacy tree).
        shapes: Shapes of the record's tensors.

    Returns:
        One float64 array per tensor.
    """
    check_shapes(tree, shapes)
    total = [np.zeros(shape, dtype=np.float64) for shape in shapes]
    for level, node in zip(tree.levels, tree.nodes, strict=True):
        weight = 1.0 / (2.0 - 0.5**level)
        for acc, value in zip(total, node, strict=True):
            acc += weight * value.astype(np.float64)
    return tuple(total)


def check_shapes(tree: TreeNoise, shapes: Sequence[tuple[int, ...]]) -> None:
    """Raises ValueError unless every buffered node has one array of each of `shapes`."""
    for node in tree.nodes:
        if [t.shape for t in node] != [tuple(s) for s in shapes]:
            raise ValueError(
                f"The aggregator's noise tree has tensors {[t.shape for t in node]}, "
                f"the model has {[tuple(s) for s in shapes]}."
            )


def to_state(tree: TreeNoise, prefix: str) -> dict[str, Tensor]:
    """Returns the tree as named arrays: "<prefix>levels" and "<prefix>noise/<i>" stacked.

    An empty tree has no arrays (as an initial, empty aggregator state).
    """
    if not tree.levels:
        return {}
    state: dict[str, Tensor] = {prefix + _LEVELS: np.array(tree.levels, dtype=np.int64)}
    for i in range(len(tree.nodes[0])):
        state[f"{prefix}{_NOISE}{i}"] = np.stack([node[i] for node in tree.nodes])
    return state


def from_state(state: Mapping[str, Tensor], prefix: str) -> TreeNoise:
    """Reads a tree written by `to_state` (missing arrays mean an empty tree).

    Raises:
        ValueError: If the arrays are inconsistent: levels not strictly increasing in
            [0, MAX_LEVEL], noise arrays missing, mis-shaped, not float32 or not finite.
    """
    noise_keys = sorted(
        (k for k in state if k.startswith(prefix + _NOISE)), key=lambda k: _index(k, prefix)
    )
    if prefix + _LEVELS not in state:
        if noise_keys:
            raise ValueError(f"Aggregator state has {prefix}noise without {prefix}levels.")
        return TreeNoise()
    levels_array = state[prefix + _LEVELS]
    if levels_array.ndim != 1 or levels_array.dtype != np.int64 or not levels_array.size:
        raise ValueError(f"Aggregator state {prefix}levels must be a non-empty int64 vector.")
    levels = tuple(int(x) for x in levels_array)
    increasing = all(a < b for a, b in itertools.pairwise(levels))
    if not (increasing and levels[0] >= 0 and levels[-1] <= MAX_LEVEL):
        raise ValueError(f"Aggregator state {prefix}levels {levels} is not a valid tree.")
    if [_index(k, prefix) for k in noise_keys] != list(range(len(noise_keys))) or not noise_keys:
        raise ValueError(f"Aggregator state {prefix}noise/<i> arrays are missing or misnumbered.")
    stacks = [state[k] for k in noise_keys]
    for key, stack in zip(noise_keys, stacks, strict=True):
        if stack.dtype != np.float32 or stack.ndim < 1 or stack.shape[0] != len(levels):
            raise ValueError(f"Aggregator state {key} must be float32 with {len(levels)} rows.")
        if not np.all(np.isfinite(stack)):
            raise ValueError(f"Aggregator state {key} has NaN or infinite values.")
    nodes = tuple(tuple(stack[j] for stack in stacks) for j in range(len(levels)))
    return TreeNoise(levels, nodes)


def _index(key: str, prefix: str) -> int:
    suffix = key[len(prefix + _NOISE) :]
    if not suffix.isdigit():
        raise ValueError(f"Aggregator state key {key!r} is not {prefix}noise/<i>.")
    return int(suffix)
