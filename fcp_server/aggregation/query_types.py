"""The interface every aggregation strategy implements, shaped like a TF-Privacy `DPQuery`.

A query is built once per round from the plan's `AggregationSpec` and the aggregator state the
previous round left (`ServerState.aggregator_state`). The accumulator asks it how to bound each
record (`record_clip`) and, for adaptive clipping (Andrew et al. 2021, arXiv 1905.03871), which
norm threshold to count records against (`quantile_threshold`); `finalize` then turns the sum of
bounded records into the round's mean update and returns the state for the next round, so a
restarted server continues the same process from the checkpoint.
"""

import dataclasses
import math
from typing import Protocol

import numpy as np

from fcp_server.aggregation.gaussian_noise import PrefetchedNormals
from fcp_server.aggregation.state import Tensor, Tensors


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """The round's aggregate, the query's measurements and its next state."""

    # The mean update, one array per trainable tensor: float64, or the weights' dtypes when
    # the noise was prefetched for them (each value rounded once from float64).
    mean: Tensors
    # Flat measurements, keys relative to "server/aggregator/".
    metrics: dict[str, float]
    # Aggregator state for the next round (checkpointed under "aggregator/").
    state: dict[str, Tensor] = dataclasses.field(default_factory=dict)


class AggregationQuery(Protocol):
    """How records are bounded and how their sum becomes the mean update."""

    def record_clip(self) -> float | None:
        """Returns the L2 bound applied to every record, or None for no clipping."""
        ...

    def quantile_threshold(self) -> float | None:
        """Returns the norm records are counted against (adaptive clipping), else None."""
        ...

    def finalize(
        self,
        total: Tensors,
        num_records: int,
        rng: np.random.Generator,
        *,
        below_threshold: int | None = None,
        normals: PrefetchedNormals | None = None,
    ) -> QueryResult:
        """Turns the sum of (clipped) records into the round's mean update and next state.

        Args:
            total: Sum of the bounded records, float32 or float64 (read-only); the queries
                compute in float64 (exact for float32: the same as converting it first).
            num_records: Records summed.
            rng: The round's noise source.
            below_threshold: Records whose L2 norm (after zeroing) was <= the
                `quantile_threshold()`; required by the adaptive queries only.
            normals: The sum's noise draws started ahead by `gaussian_noise.prefetch_normals`
                from `rng`, for the queries whose `noises_sum()` is true; None draws them
                here.
        """
        ...

    def noises_sum(self) -> bool:
        """Returns whether `finalize` adds `gaussian_noise.noised` noise to every sum element.

        Such noise does not depend on the records, so it can be drawn while they are summed.
        """
        ...


class FixedClip:
    """The bounding of queries whose clip C does not adapt: clip every record to C."""

    clip: float

    def record_clip(self) -> float | None:
        """Returns the fixed L2 clip C."""
        return self.clip

    def quantile_threshold(self) -> float | None:
        """Returns None: nothing is counted, the clip is fixed."""
        return None


def dp_facts(z: float, clip: float, std_of_mean: float, denominator: float) -> dict[str, float]:
    """Returns the DP measurements every DP query reports (keys under "dp/")."""
    return {
        "dp/noise_multiplier": z,
        "dp/clip_norm": clip,
        "dp/noise_stddev": std_of_mean,
        "dp/denominator": float(denominator),
    }


def check_records(num_records: int, below_threshold: int | None, needs_count: bool) -> int:
    """Validates the record counts a query is finalized with.

    Args:
        num_records: Records summed; must be > 0.
        below_threshold: The below-threshold count, or None.
        needs_count: Whether the query reads `below_threshold`.

    Returns:
        The below-threshold count (0 when not needed and not given).

    Raises:
        ValueError: If no record was summed, or the count is missing or out of range.
    """
    if num_records <= 0:
        raise ValueError("Cannot aggregate a round without any update.")
    if below_threshold is None:
        if needs_count:
            raise ValueError("Adaptive clipping needs the count of records below the threshold.")
        return 0
    if not 0 <= below_threshold <= num_records:
        raise ValueError(f"below_threshold must be in [0, {num_records}], found {below_threshold}.")
    return below_threshold


def check_non_negative(value: float, name: str, dp_type: str) -> None:
    """Raises ValueError naming the plan field unless `value` is finite and >= 0."""
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{dp_type} needs a non-negative `{name}`, found {value}.")


def check_positive(value: float, name: str, dp_type: str) -> None:
    """Raises ValueError naming the plan field unless `value` is finite and > 0."""
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{dp_type} needs a positive `{name}`, found {value}.")
