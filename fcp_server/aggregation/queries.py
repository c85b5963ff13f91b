"""Aggregation strategies chosen from `AggregationSpec.dp_type`, shaped like TF-Privacy DPQueries.

A query says how each record is clipped before it is summed and how the sum becomes the
round's mean update (interface in `query_types`):

* `UNKNOWN` (the task builder's `--skip_dp_aggregator`): `UnweightedMeanQuery`, TFF's
  `UnweightedMeanFactory` - no clipping, sum / number of records received.
* `FIXED_GAUSSIAN`: `FixedGaussianQuery`, TFF's `DifferentiallyPrivateFactory.gaussian_fixed`
  = `NormalizedQuery(GaussianSumQuery(l2_norm_clip=C, stddev=z*C), denominator=clients_per_round)`
  (McMahan et al. 2018, arXiv 1710.17220): the sum gets N(0, (z*C)^2) noise and is divided by
  the *fixed* report goal, not by the number received, so the sensitivity stays C/n.
* `ADAPTIVE_GAUSSIAN`: `adaptive_clipping.AdaptiveGaussianQuery` (`gaussian_adaptive`,
  Andrew et al. 2021, arXiv 1905.03871).
* `TREE_AGGREGATION` / `ADAPTIVE_TREE`: `tree_queries.TreeAggregationQuery` /
  `AdaptiveTreeQuery` (`tree_aggregation` / `tree_adaptive`, DP-FTRL, Kairouz et al. 2021,
  arXiv 2103.00039).

The adaptive and tree queries carry state across rounds in `ServerState.aggregator_state`.
"""

import dataclasses
from collections.abc import Mapping

import numpy as np

from fcp_server.aggregation import dp, gaussian_noise
from fcp_server.aggregation.adaptive_clipping import AdaptiveGaussianQuery, AdaptiveParams
from fcp_server.aggregation.query_types import (
    AggregationQuery,
    FixedClip,
    QueryResult,
    check_non_negative,
    check_positive,
    check_records,
    dp_facts,
)
from fcp_server.aggregation.state import Tensor, Tensors
from fcp_server.aggregation.tree_queries import AdaptiveTreeQuery, TreeAggregationQuery
from fcp_server.protos import plan_pb2, task_builder_pb2

__all__ = [
    "AdaptiveGaussianQuery",
    "AdaptiveTreeQuery",
    "AggregationQuery",
    "FixedGaussianQuery",
    "QueryResult",
    "TreeAggregationQuery",
    "UnweightedMeanQuery",
    "make_query",
]

_DpType = task_builder_pb2.DpAggregator


@dataclasses.dataclass(frozen=True)
class UnweightedMeanQuery:
    """Plain mean over the records received (TFF `UnweightedMeanFactory`), no DP."""

    def record_clip(self) -> float | None:
        """Returns None: the non-DP mean does not clip (as TFF without a DP aggregator)."""
        return None

    def quantile_threshold(self) -> float | None:
        """Returns None: nothing adapts."""
        return None

    def noises_sum(self) -> bool:
        """Returns False: the plain mean has no noise."""
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
        """Returns total / num_records (and an empty state).

        Args:
            total: Sum of the records (float32 or float64; divided in float64).
            num_records: Records summed, > 0.
            rng: Unused (no noise); part of the query interface.
            below_threshold: Unused.
            normals: Unused (no noise).

        Raises:
            ValueError: If no record was summed.
        """
        check_records(num_records, below_threshold, needs_count=False)
        mean = tuple(np.divide(t, num_records, dtype=np.float64) for t in total)
        return QueryResult(mean, dp_facts(0.0, 0.0, 0.0, num_records))


@dataclasses.dataclass(frozen=True)
class FixedGaussianQuery(FixedClip):
    """Gaussian sum query with a fixed clip and a fixed denominator (TFF `gaussian_fixed`)."""

    noise_multiplier: float
    clip: float
    clients_per_round: int

    def __post_init__(self) -> None:
        """Validates the parameters like TFF's `gaussian_fixed` does."""
        check_non_negative(self.noise_multiplier, "noise_multiplier", "FIXED_GAUSSIAN")
        check_positive(self.clip, "clip_norm", "FIXED_GAUSSIAN")
        if self.clients_per_round <= 0:
            raise ValueError(
                f"FIXED_GAUSSIAN needs `clients_per_round` > 0, found {self.clients_per_round}."
            )

    def noises_sum(self) -> bool:
        """Returns True: every element of the sum gets N(0, (z*C)^2) noise."""
        return True

    def finalize(
        self,
        total: Tensors,
        num_records: int,
        rng: np.random.Generator,
        *,
        below_threshold: int | None = None,
        normals: gaussian_noise.PrefetchedNormals | None = None,
    ) -> QueryResult:
        """Adds N(0, (z*C)^2) to the sum and divides by `clients_per_round`.

        Args:
            total: Sum of the clipped records (float32 or float64; noised in float64).
            num_records: Records summed, > 0 (the noise does not depend on it).
            rng: Noise source, see `gaussian_noise.make_noise_rng`.
            below_threshold: Unused.
            normals: The noise's draws from `rng`, started ahead
                (`gaussian_noise.prefetch_normals`).

        Raises:
            ValueError: If no record was summed.
        """
        check_records(num_records, below_threshold, needs_count=False)
        std = dp.noise_stddev(self.noise_multiplier, self.clip)
        mean = gaussian_noise.noised(
            total, std, rng, divisor=self.clients_per_round, normals=normals
        )
        std_of_mean = std / self.clients_per_round
        return QueryResult(
            mean, dp_facts(self.noise_multiplier, self.clip, std_of_mean, self.clients_per_round)
        )


def make_query(
    spec: plan_pb2.AggregationSpec, aggregator_state: Mapping[str, Tensor] | None = None
) -> AggregationQuery:
    """Returns the round's query for `spec.dp_type`, continuing from the carried state.

    Args:
        spec: The plan's aggregation settings (unset adaptive fields get the task builder's
            defaults: initial clip 0.1, target quantile 0.5, clip learning rate 0.2,
            clipped_count_stddev clients_per_round / 20, tree restarts 1024 / 128).
        aggregator_state: `ServerState.aggregator_state` from the previous round (empty or
            None for the first round).

    Raises:
        ValueError: For an unknown enum value, out-of-range parameters (including TFF's
            noise_multiplier < 2 * clipped_count_stddev rule) or an inconsistent state.
    """
    state: Mapping[str, Tensor] = aggregator_state or {}
    dp_type = spec.dp_type
    if dp_type == _DpType.UNKNOWN:
        return UnweightedMeanQuery()
    if dp_type == _DpType.FIXED_GAUSSIAN:
        return FixedGaussianQuery(
            noise_multiplier=spec.noise_multiplier,
            clip=spec.clip_norm,
            clients_per_round=spec.clients_per_round,
        )
    if dp_type == _DpType.ADAPTIVE_GAUSSIAN:
        return AdaptiveGaussianQuery.from_state(AdaptiveParams.from_spec(spec), state)
    if dp_type == _DpType.TREE_AGGREGATION:
        return TreeAggregationQuery.from_state(
            spec.noise_multiplier, spec.clip_norm, spec.clients_per_round, state
        )
    if dp_type == _DpType.ADAPTIVE_TREE:
        return AdaptiveTreeQuery.from_state(
            AdaptiveParams.from_spec(spec), spec.restart_frequency, spec.restart_warmup, state
        )
    raise ValueError(f"Unknown DP aggregator type {dp_type} in the plan.")
