"""TREE_AGGREGATION and ADAPTIVE_TREE: DP-FTRL's tree-aggregated noise, fixed or adaptive clip.

Kairouz et al., "Practical and Private (Deep) Learning without Sampling or Shuffling" (ICML
2021, arXiv 2103.00039), as TFF 0.87 builds them (the task builder wraps both in
`zeroing_factory(100 x clip)`, L-inf, which `RoundAccumulator` applies from
`AggregationSpec.zeroing_norm`):

* TREE_AGGREGATION = `DifferentiallyPrivateFactory.tree_aggregation`:
  `NormalizedQuery(TreeResidualSumQuery.build_l2_gaussian_query(C, z, use_efficient=True),
  clients_per_round)`. Records are clipped to C; each round releases the sum plus the
  difference of the tree's prefix-sum noise now and one round ago (node std z * C).
* ADAPTIVE_TREE = `tree_adaptive`: `QAdaClipTreeResSumQuery` (Andrew et al. 2021, arXiv
  1905.03871) in a `RestartQuery(PeriodicRoundRestartIndicator(period, warmup))`. The records
  are clipped to the tree's clip but counted against a quantile estimate that moves every
  round; the below-count is privatised by its own tree (node std clipped_count_stddev). When
  the indicator fires (after round k with k % period == warmup) the estimate becomes the clip
  and both trees restart.

The trees, clips, estimate and round counter are the aggregator state, so a checkpoint carries
the noise process; every fresh node comes from the round's generator (see `tree_noise`).
"""

import dataclasses
from collections.abc import Mapping

import numpy as np

from fcp_server.aggregation import gaussian_noise, tree_noise
from fcp_server.aggregation import quantile_estimation as qe
from fcp_server.aggregation.adaptive_clipping import AdaptiveParams, read_scalar
from fcp_server.aggregation.query_types import (
    FixedClip,
    QueryResult,
    check_non_negative,
    check_positive,
    check_records,
    dp_facts,
)
from fcp_server.aggregation.state import Tensor, Tensors

VALUE_TREE = "tree/"
COUNT_TREE = "count_tree/"
CLIP_KEY = "adaptive/clip"
ESTIMATE_KEY = "adaptive/estimate"
ROUNDS_KEY = "restart/rounds"
DEFAULT_RESTART_FREQUENCY = 1024
DEFAULT_RESTART_WARMUP = 128
# The count tree aggregates the scalar 1[norm <= estimate] - 0.5 (clip 0.5, as TF-Privacy).
_SCALAR: tuple[tuple[int, ...], ...] = ((),)
_EMPTY = tree_noise.TreeNoise()


def _noised_residual(
    tree: tree_noise.TreeNoise, total: Tensors, std: float, rng: np.random.Generator
) -> tuple[Tensors, tree_noise.TreeNoise]:
    """Adds one leaf; returns (total + prefix noise now - prefix noise before, new tree)."""
    shapes = [t.shape for t in total]
    before = tree_noise.cumulative_noise(tree, shapes)
    grown = tree_noise.add_leaf(tree, shapes, std, rng)
    after = tree_noise.cumulative_noise(grown, shapes)
    noised = tuple(t + a - b for t, a, b in zip(total, after, before, strict=True))
    return noised, grown


@dataclasses.dataclass(frozen=True)
class TreeAggregationQuery(FixedClip):
    """One round of `TreeResidualSumQuery` (efficient tree) normalized by clients_per_round."""

    noise_multiplier: float
    clip: float
    clients_per_round: int
    tree: tree_noise.TreeNoise = _EMPTY

    def __post_init__(self) -> None:
        """Validates like TFF's `tree_aggregation`."""
        check_non_negative(self.noise_multiplier, "noise_multiplier", "TREE_AGGREGATION")
        check_positive(self.clip, "clip_norm", "TREE_AGGREGATION")
        if self.clients_per_round <= 0:
            raise ValueError("TREE_AGGREGATION needs `clients_per_round` > 0.")

    def noises_sum(self) -> bool:
        """Returns False: the noise comes from the tree's nodes, not one draw per element."""
        return False

    @classmethod
    def from_state(
        cls, z: float, clip: float, clients_per_round: int, state: Mapping[str, Tensor]
    ) -> "TreeAggregationQuery":
        """Builds the round's query from the tree carried in the aggregator state."""
        return cls(z, clip, clients_per_round, tree_noise.from_state(state, VALUE_TREE))

    def finalize(
        self,
        total: Tensors,
        num_records: int,
        rng: np.random.Generator,
        *,
        below_threshold: int | None = None,
        normals: gaussian_noise.PrefetchedNormals | None = None,
    ) -> QueryResult:
        """Adds the tree's residual noise to the sum and divides by clients_per_round.

        `normals` is unused: the tree's noise is drawn per tree node (`noises_sum` is False).

        Raises:
            ValueError: If no record was summed or the tree does not fit the model.
        """
        check_records(num_records, below_threshold, needs_count=False)
        std = self.noise_multiplier * self.clip
        noised, grown = _noised_residual(self.tree, total, std, rng)
        m = self.clients_per_round
        metrics = dp_facts(self.noise_multiplier, self.clip, std / m, m)
        metrics["dp/tree_leaves"] = float(grown.num_leaves())
        return QueryResult(
            tuple(t / m for t in noised), metrics, tree_noise.to_state(grown, VALUE_TREE)
        )


def _restart_schedule(frequency: int, warmup: int) -> tuple[int, int]:
    """Returns (period, warmup) with the reference defaults for 0, validated like TF-Privacy."""
    period = frequency or DEFAULT_RESTART_FREQUENCY
    first = warmup or DEFAULT_RESTART_WARMUP
    if period < 2 or not 1 <= first < period:
        raise ValueError(
            f"ADAPTIVE_TREE needs restart_frequency >= 2 and 1 <= restart_warmup < "
            f"restart_frequency, found {period} and {first}."
        )
    return period, first


def _read_rounds(state: Mapping[str, Tensor]) -> int:
    if ROUNDS_KEY not in state:
        return 0
    value = state[ROUNDS_KEY]
    if value.shape != () or value.dtype != np.int64 or int(value) < 0:
        raise ValueError(f"Aggregator state {ROUNDS_KEY} must be a non-negative int64 scalar.")
    return int(value)


@dataclasses.dataclass(frozen=True)
class AdaptiveTreeQuery:
    """One round of `RestartQuery(QAdaClipTreeResSumQuery)` normalized by clients_per_round."""

    params: AdaptiveParams
    restart_period: int
    restart_warmup: int
    # The clip of the current tree (changes only at a restart).
    clip: float
    # The quantile estimate (changes every round).
    estimate: float
    # Rounds aggregated since the task started (the restart indicator's counter).
    rounds: int = 0
    value_tree: tree_noise.TreeNoise = _EMPTY
    count_tree: tree_noise.TreeNoise = _EMPTY

    @classmethod
    def from_state(
        cls, params: AdaptiveParams, frequency: int, warmup: int, state: Mapping[str, Tensor]
    ) -> "AdaptiveTreeQuery":
        """Builds the round's query from the carried state (initial clip when absent)."""
        period, first = _restart_schedule(frequency, warmup)
        count_tree = tree_noise.from_state(state, COUNT_TREE)
        tree_noise.check_shapes(count_tree, _SCALAR)
        return cls(
            params=params,
            restart_period=period,
            restart_warmup=first,
            clip=read_scalar(state, CLIP_KEY, params.initial_clip),
            estimate=read_scalar(state, ESTIMATE_KEY, params.initial_clip),
            rounds=_read_rounds(state),
            value_tree=tree_noise.from_state(state, VALUE_TREE),
            count_tree=count_tree,
        )

    def record_clip(self) -> float | None:
        """Returns the current tree's clip."""
        return self.clip

    def quantile_threshold(self) -> float | None:
        """Returns the quantile estimate records are counted against."""
        return self.estimate

    def noises_sum(self) -> bool:
        """Returns False: the noise comes from the trees' nodes, not one draw per element."""
        return False

    def finalize(
        self,
        total: Tensors,
        num_records: int,
        rng: np.random.Generator,
        *,
        below_threshold: int | None = None,
        normals: gaussian_noise.PrefetchedNormals | None = None,
    ) -> QueryResult:
        """Noises the sum and the below-count with their trees, then maybe restarts.

        `normals` is unused: the tree's noise is drawn per tree node (`noises_sum` is False).

        Raises:
            ValueError: If no record was summed, the count is missing or the state is invalid.
        """
        below = check_records(num_records, below_threshold, needs_count=True)
        p, m = self.params, self.params.clients_per_round
        value_z = p.value_noise_multiplier()
        std = value_z * self.clip
        noised, value_tree = _noised_residual(self.value_tree, total, std, rng)
        # TF-Privacy: a tree query with clip 0.5 and multiplier 2 * stddev, i.e. node std stddev.
        shifted = (np.array(qe.shifted_count(below, num_records)),)
        (count,), count_tree = _noised_residual(
            self.count_tree, shifted, p.clipped_count_stddev, rng
        )
        fraction = qe.below_estimate_fraction(float(count), m)
        estimate = qe.next_estimate(self.estimate, fraction, p.target_quantile, p.learning_rate)
        rounds = self.rounds + 1
        restart = rounds % self.restart_period == self.restart_warmup
        clip = self.clip
        if restart:
            # The estimate becomes the clip and both trees start over with zero noise.
            clip = max(estimate, float(np.finfo(np.float64).tiny))
            value_tree = count_tree = _EMPTY
        metrics = dp_facts(value_z, self.clip, std / m, m)
        metrics.update(
            {
                "dp/unclipped_quantile_estimate": fraction,
                "dp/clip_estimate": estimate,
                "dp/next_clip_norm": clip,
                "dp/tree_restarted": float(restart),
                "dp/tree_leaves": float(value_tree.num_leaves()),
                "dp/clipped_count_stddev": p.clipped_count_stddev,
                "dp/effective_noise_multiplier": p.noise_multiplier,
            }
        )
        state = {
            CLIP_KEY: np.array(clip, dtype=np.float64),
            ESTIMATE_KEY: np.array(max(estimate, np.finfo(np.float64).tiny), dtype=np.float64),
            ROUNDS_KEY: np.array(rounds, dtype=np.int64),
            **tree_noise.to_state(value_tree, VALUE_TREE),
            **tree_noise.to_state(count_tree, COUNT_TREE),
        }
        return QueryResult(tuple(t / m for t in noised), metrics, state)
