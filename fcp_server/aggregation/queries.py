"""Aggregation strategies chosen from `AggregationSpec.dp_type`, shaped like TF-Privacy DPQueries.

A query says how each record is clipped before it is summed and how the sum becomes the
round's mean update:

* `UNKNOWN` (the task builder's `--skip_dp_aggregator`): `UnweightedMeanQuery`, TFF's
  `UnweightedMeanFactory` - no clipping, sum / number of records received.
* `FIXED_GAUSSIAN`: `FixedGaussianQuery`, TFF's `DifferentiallyPrivateFactory.gaussian_fixed`
  = `NormalizedQuery(GaussianSumQuery(l2_norm_clip=C, stddev=z*C), denominator=clients_per_round)`
  (McMahan et al. 2018, arXiv 1710.17220): the sum gets N(0, (z*C)^2) noise and is divided by
  the *fixed* report goal, not by the number received, so the sensitivity stays C/n.

Adaptive clipping (Andrew et al. 2021, arXiv 1905.03871) and tree aggregation (Kairouz et al.
2021, arXiv 2103.00039) need state that evolves across rounds (`ServerState.aggregator_state`)
and are added as further `AggregationQuery` implementations; until then `make_query` refuses
them with `UnsupportedAggregation` instead of silently falling back to fixed clipping.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from fcp_server.aggregation import dp
from fcp_server.aggregation.state import Tensor, Tensors
from fcp_server.protos import plan_pb2, task_builder_pb2

_DpType = task_builder_pb2.DpAggregator


class UnsupportedAggregation(NotImplementedError):
    """The plan asks for a DP aggregator this server does not implement yet."""


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """The round's aggregate and the query's own measurements."""

    # The mean update in float64, one array per trainable tensor.
    mean: Tensors
    # Flat measurements, keys relative to "server/aggregator/".
    metrics: dict[str, float]


class AggregationQuery(Protocol):
    """How records are bounded and how their sum becomes the mean update."""

    def record_clip(self) -> float | None:
        """Returns the L2 bound applied to every record, or None for no clipping."""
        ...

    def finalize(self, total: Tensors, num_records: int, rng: np.random.Generator) -> QueryResult:
        """Turns the sum of (clipped) records into the round's mean update."""
        ...

    def next_state(self, clipped_count: int, num_records: int) -> dict[str, Tensor]:
        """Returns the aggregator state for the next round (adaptive clipping uses this)."""
        ...


@dataclasses.dataclass(frozen=True)
class UnweightedMeanQuery:
    """Plain mean over the records received (TFF `UnweightedMeanFactory`), no DP."""

    def record_clip(self) -> float | None:
        """Returns None: the non-DP mean does not clip (as TFF without a DP aggregator)."""
        return None

    def finalize(self, total: Tensors, num_records: int, rng: np.random.Generator) -> QueryResult:
        """Returns total / num_records.

        Args:
            total: Sum of the records (float64).
            num_records: Records summed, > 0.
            rng: Unused (no noise); part of the query interface.

        Raises:
            ValueError: If no record was summed.
        """
        if num_records <= 0:
            raise ValueError("Cannot average a round without any update.")
        mean = tuple(t / num_records for t in total)
        return QueryResult(mean, _dp_facts(0.0, 0.0, 0.0, num_records))

    def next_state(self, clipped_count: int, num_records: int) -> dict[str, Tensor]:
        """Returns the (empty) state: nothing carries over between rounds."""
        return {}


@dataclasses.dataclass(frozen=True)
class FixedGaussianQuery:
    """Gaussian sum query with a fixed clip and a fixed denominator (TFF `gaussian_fixed`)."""

    noise_multiplier: float
    clip: float
    clients_per_round: int

    def __post_init__(self) -> None:
        """Validates the parameters like TFF's `gaussian_fixed` does."""
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0.0):
            raise ValueError(
                "FIXED_GAUSSIAN needs a non-negative `noise_multiplier`, "
                f"found {self.noise_multiplier}."
            )
        if not (math.isfinite(self.clip) and self.clip > 0.0):
            raise ValueError(f"FIXED_GAUSSIAN needs a positive `clip_norm`, found {self.clip}.")
        if self.clients_per_round <= 0:
            raise ValueError(
                f"FIXED_GAUSSIAN needs `clients_per_round` > 0, found {self.clients_per_round}."
            )

    def record_clip(self) -> float | None:
        """Returns the fixed L2 clip C."""
        return self.clip

    def finalize(self, total: Tensors, num_records: int, rng: np.random.Generator) -> QueryResult:
        """Adds N(0, (z*C)^2) to the sum and divides by `clients_per_round`.

        Args:
            total: Sum of the clipped records (float64).
            num_records: Records summed, > 0 (the noise does not depend on it).
            rng: Noise source, see `dp.make_noise_rng`.

        Raises:
            ValueError: If no record was summed.
        """
        if num_records <= 0:
            raise ValueError("Cannot aggregate a round without any update.")
        std = dp.noise_stddev(self.noise_multiplier, self.clip)
        noised = dp.add_gaussian_noise(total, std, rng)
        mean = tuple(t / self.clients_per_round for t in noised)
        std_of_mean = std / self.clients_per_round
        return QueryResult(
            mean, _dp_facts(self.noise_multiplier, self.clip, std_of_mean, self.clients_per_round)
        )

    def next_state(self, clipped_count: int, num_records: int) -> dict[str, Tensor]:
        """Returns the (empty) state: a fixed clip does not adapt."""
        return {}


def _dp_facts(z: float, clip: float, std_of_mean: float, denominator: int) -> dict[str, float]:
    return {
        "dp/noise_multiplier": z,
        "dp/clip_norm": clip,
        "dp/noise_stddev": std_of_mean,
        "dp/denominator": float(denominator),
    }


def make_query(
    spec: plan_pb2.AggregationSpec, aggregator_state: Mapping[str, Tensor] | None = None
) -> AggregationQuery:
    """Returns the query for `spec.dp_type`.

    Args:
        spec: The plan's aggregation settings.
        aggregator_state: State carried from the previous round (unused by the types
            implemented so far; adaptive clipping will read its current clip from it).

    Raises:
        UnsupportedAggregation: For ADAPTIVE_GAUSSIAN, TREE_AGGREGATION and ADAPTIVE_TREE.
        ValueError: For an unknown enum value or out-of-range parameters.
    """
    del aggregator_state  # Read by the adaptive queries once they exist.
    if spec.dp_type == _DpType.UNKNOWN:
        return UnweightedMeanQuery()
    if spec.dp_type == _DpType.FIXED_GAUSSIAN:
        return FixedGaussianQuery(
            noise_multiplier=spec.noise_multiplier,
            clip=spec.clip_norm,
            clients_per_round=spec.clients_per_round,
        )
    if spec.dp_type in (
        _DpType.ADAPTIVE_GAUSSIAN,
        _DpType.TREE_AGGREGATION,
        _DpType.ADAPTIVE_TREE,
    ):
        name = _DpType.Enum.Name(spec.dp_type)
        raise UnsupportedAggregation(
            f"DP aggregator {name} is not supported by this server yet; "
            "only FIXED_GAUSSIAN and no DP aggregator (UNKNOWN) are."
        )
    raise ValueError(f"Unknown DP aggregator type {spec.dp_type} in the plan.")
