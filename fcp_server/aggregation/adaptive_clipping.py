"""ADAPTIVE_GAUSSIAN: Gaussian sum query whose clip tracks a quantile of the update norms.

TFF 0.87's `DifferentiallyPrivateFactory.gaussian_adaptive` = `NormalizedQuery(
QuantileAdaptiveClipSumQuery(..., geometric_update=True), denominator=clients_per_round)` of
TF-Privacy 0.9.0 (Andrew et al. 2021, arXiv 1905.03871; DP-FedAvg, McMahan et al. 2018,
arXiv 1710.06963). One round, with C the clip the previous round chose:

1. each record is clipped to C and counted as below when its norm is <= C;
2. the sum gets `N(0, (value_z * C)^2)` (value noise first, as TF-Privacy draws it);
3. the shifted below-count gets `N(0, clipped_count_stddev^2)`, giving the private unclipped
   fraction (see `quantile_estimation`), and C moves geometrically toward the target quantile;
4. the noised sum is divided by clients_per_round.

The new C is the whole aggregator state ("adaptive/clip"), so a restarted server continues
with the clip the last checkpoint recorded.
"""

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from fcp_server.aggregation import dp, gaussian_noise
from fcp_server.aggregation import quantile_estimation as qe
from fcp_server.aggregation.query_types import (
    QueryResult,
    check_non_negative,
    check_positive,
    check_records,
    dp_facts,
)
from fcp_server.aggregation.state import Tensor, Tensors
from fcp_server.protos import plan_pb2

CLIP_KEY = "adaptive/clip"
_NAME = "ADAPTIVE_GAUSSIAN"
_TINY = float(np.finfo(np.float64).tiny)


@dataclasses.dataclass(frozen=True)
class AdaptiveParams:
    """The adaptive-clipping settings of a plan, with TFF/ODP defaults for unset (0) fields."""

    # Effective total noise multiplier z (value and count noise together).
    noise_multiplier: float
    # The fixed denominator and expected number of records.
    clients_per_round: int
    initial_clip: float
    target_quantile: float
    learning_rate: float
    clipped_count_stddev: float

    def __post_init__(self) -> None:
        """Validates like TFF's factories, so a bad plan is refused at task creation."""
        check_non_negative(self.noise_multiplier, "noise_multiplier", _NAME)
        if self.clients_per_round <= 0:
            raise ValueError(f"{_NAME} needs `clients_per_round` > 0.")
        check_positive(self.initial_clip, "init_clip_norm", _NAME)
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError(
                f"`target_unclipped_quantile` must be in [0, 1], found {self.target_quantile}."
            )
        check_non_negative(self.learning_rate, "clip_learning_rate", _NAME)
        check_non_negative(self.clipped_count_stddev, "clipped_count_stddev", _NAME)
        self.value_noise_multiplier()  # Raises when z >= 2 * clipped_count_stddev.

    @classmethod
    def from_spec(cls, spec: plan_pb2.AggregationSpec) -> "AdaptiveParams":
        """Reads the plan, filling unset fields as the task builder does."""
        clients = int(spec.clients_per_round)
        return cls(
            noise_multiplier=spec.noise_multiplier,
            clients_per_round=clients,
            initial_clip=spec.init_clip_norm or qe.DEFAULT_INIT_CLIP_NORM,
            target_quantile=spec.target_unclipped_quantile or qe.DEFAULT_TARGET_QUANTILE,
            learning_rate=spec.clip_learning_rate or qe.DEFAULT_CLIP_LEARNING_RATE,
            clipped_count_stddev=(
                spec.clipped_count_stddev or qe.default_clipped_count_stddev(clients)
            ),
        )

    def value_noise_multiplier(self) -> float:
        """Returns the multiplier of the value noise (above z, see `quantile_estimation`)."""
        return qe.value_noise_multiplier(self.noise_multiplier, self.clipped_count_stddev)


def read_scalar(state: Mapping[str, Tensor], key: str, default: float) -> float:
    """Returns a positive finite float scalar of the aggregator state, or `default` if absent.

    Raises:
        ValueError: If the entry is not a finite positive scalar.
    """
    if key not in state:
        return default
    value = state[key]
    if value.shape != () or not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f"Aggregator state {key} must be a float scalar.")
    result = float(value)
    if not (math.isfinite(result) and result > 0.0):
        raise ValueError(f"Aggregator state {key} must be positive and finite, found {result}.")
    return result


@dataclasses.dataclass(frozen=True)
class AdaptiveGaussianQuery:
    """One round of TF-Privacy's `QuantileAdaptiveClipSumQuery`, normalized by m."""

    params: AdaptiveParams
    # The clip of this round (chosen by the previous round).
    clip: float

    @classmethod
    def from_state(
        cls, params: AdaptiveParams, state: Mapping[str, Tensor]
    ) -> "AdaptiveGaussianQuery":
        """Builds the round's query from the carried clip (the initial clip when absent)."""
        return cls(params, read_scalar(state, CLIP_KEY, params.initial_clip))

    def record_clip(self) -> float | None:
        """Returns the current clip C."""
        return self.clip

    def quantile_threshold(self) -> float | None:
        """Returns C: records are counted as unclipped when their norm is <= C."""
        return self.clip

    def noises_sum(self) -> bool:
        """Returns True: every element of the sum gets value noise."""
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
        """Noises the sum with the current clip, then adapts the clip for the next round.

        Args:
            total: Sum of the records clipped to `clip` (float32 or float64; noised in float64).
            num_records: Records summed, > 0.
            rng: Noise source (value noise is drawn before the count noise).
            below_threshold: Records whose norm was <= `clip`.
            normals: The value noise's draws from `rng`, started ahead
                (`gaussian_noise.prefetch_normals`).

        Raises:
            ValueError: If no record was summed or the count is missing or out of range.
        """
        below = check_records(num_records, below_threshold, needs_count=True)
        p = self.params
        value_z = p.value_noise_multiplier()
        std = dp.noise_stddev(value_z, self.clip)
        m = p.clients_per_round
        mean = gaussian_noise.noised(total, std, rng, divisor=m, normals=normals)
        count_noise = float(rng.normal(loc=0.0, scale=p.clipped_count_stddev))
        shifted = qe.shifted_count(below, num_records) + count_noise
        fraction = qe.below_estimate_fraction(shifted, p.clients_per_round)
        # TF-Privacy clamps at 0; a clip that underflowed to 0 would fail every later round, so
        # keep the smallest positive float instead (only reachable after thousands of rounds).
        new_clip = max(
            qe.next_estimate(self.clip, fraction, p.target_quantile, p.learning_rate), _TINY
        )
        metrics = dp_facts(value_z, self.clip, std / m, m)
        metrics.update(
            {
                "dp/unclipped_quantile_estimate": fraction,
                "dp/next_clip_norm": new_clip,
                "dp/clipped_count_stddev": p.clipped_count_stddev,
                "dp/effective_noise_multiplier": p.noise_multiplier,
            }
        )
        return QueryResult(mean, metrics, {CLIP_KEY: np.array(new_clip, dtype=np.float64)})
