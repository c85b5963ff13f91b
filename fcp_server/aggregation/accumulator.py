"""Streaming sum of a round's device updates: zero, clip, add (memory independent of clients).

This is the client-to-server half of TFF's DP-FedAvg aggregation (`DifferentiallyPrivateFactory`
wrapped, when configured, in `zeroing_factory`; McMahan et al. 2018, arXiv 1710.17220), done one
update at a time as uploads are read from the blob store:

1. non-finite record -> zeroed and counted (TFF `zero_all_if_any_non_finite`; uploads are
   already rejected by `checkpoints.decode_update`, this is defence in depth);
2. L-inf norm above `AggregationSpec.zeroing_norm` (> 0) -> zeroed and counted;
3. clipped on the server to the query's L2 bound whatever the device did, counting clipped
   records, and, for adaptive clipping, counting records whose norm is at most the query's
   quantile threshold (a zeroed record has norm 0, as TFF's zeroed values do);
4. added to a float64 running sum. TFF sums in the tensors' dtype (float32); a float64 sum cast
   once at the end is at least as accurate and differs from TFF only by float32 rounding.

Zeroed records still count as records, as in TFF. Metric state is summed alongside, after
per-device clamping (see `metrics.clamp_state`). For an EVALUATION plan only metric state is
accumulated (`fedavg.finalize_evaluation`).
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from fcp_server.aggregation import dp, metrics, queries
from fcp_server.aggregation.state import ClientUpdate, Tensor, Tensors, all_finite
from fcp_server.protos import plan_pb2

# Elements per chunk of the float64 passes (2 MiB of float64): big enough to amortise numpy's
# per-call cost, small enough that no full-size float64 copy of a large tensor is made.
_CHUNK = 1 << 18


def _sum_of_squares(tensors: Sequence[Tensor]) -> float:
    """The float64 sum of squares of all elements (NaN/Inf propagate), chunk by chunk."""
    total = 0.0
    for t in tensors:
        flat = t.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start : start + _CHUNK].astype(np.float64)
            total += float(np.dot(chunk, chunk))
    return total


def _add_scaled(sums: Sequence[Tensor], tensors: Sequence[Tensor], scale: float | None) -> None:
    """Adds the tensors (times `scale` when given) to the sums, in float64, in place."""
    for total, t in zip(sums, tensors, strict=True):
        # Explicit float64 chunks: numpy's own mixed-dtype `total += t` casts in small
        # buffers and is about 3x slower.
        flat_total, flat = total.reshape(-1), t.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start : start + _CHUNK].astype(np.float64)
            if scale is not None:
                chunk *= scale
            flat_total[start : start + _CHUNK] += chunk


@dataclasses.dataclass(frozen=True)
class AddResult:
    """What happened to one update when it was added."""

    # Global L2 norm of the update as received (NaN if it was non-finite).
    l2_norm: float
    non_finite: bool
    zeroed: bool
    clipped: bool


class RoundAccumulator:
    """Running sums of one round; holds one float64 array per tensor, never the updates."""

    def __init__(
        self,
        plan: plan_pb2.ServerPlan,
        aggregator_state: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Prepares empty sums for the plan's model and metrics.

        Args:
            plan: The round's server plan.
            aggregator_state: `ServerState.aggregator_state` (the current clip, quantile
                estimate and noise trees of the adaptive and tree aggregators).

        Raises:
            ValueError: If the plan's aggregation or metric specs, or the aggregator state,
                are invalid.
        """
        evaluation = plan.kind == plan_pb2.PlanKind.EVALUATION
        # Evaluation devices upload metric state only: no model delta, nothing to privatise.
        self.query: queries.AggregationQuery = (
            queries.UnweightedMeanQuery()
            if evaluation
            else queries.make_query(plan.aggregation, aggregator_state)
        )
        self._clip = self.query.record_clip()
        self._threshold = self.query.quantile_threshold()
        self._zeroing_norm = plan.aggregation.zeroing_norm
        if not (math.isfinite(self._zeroing_norm) and self._zeroing_norm >= 0.0):
            raise ValueError(f"zeroing_norm must be >= 0, found {self._zeroing_norm}.")
        self._shapes = [] if evaluation else [tuple(t.shape) for t in plan.model.trainable]
        self._sum = [np.zeros(s, dtype=np.float64) for s in self._shapes]
        self._metric_specs = {m.name: m for m in plan.metrics}
        for spec in plan.metrics:
            metrics.validate_metric_spec(spec)
        self._metric_sums = {
            m.name: np.zeros(metrics.state_size(m), dtype=np.float64) for m in plan.metrics
        }
        self.num_updates = 0
        self.num_examples = 0
        self.clipped_count = 0
        self.non_finite_count = 0
        self.zeroed_count = 0
        # Records whose L2 norm was <= the query's quantile threshold (adaptive clipping).
        self.below_threshold_count = 0

    def add(self, update: ClientUpdate) -> AddResult:
        """Zeroes/clips one update and adds it (and its metric state) to the sums.

        Args:
            update: A decoded update (see `checkpoints.decode_update`).

        Returns:
            What was done to the update.

        Raises:
            ValueError: If the update does not have the plan's tensor shapes or metrics.
        """
        self._check_shapes(update)
        tensors = update.trainable
        norm = math.sqrt(_sum_of_squares(tensors))
        # A NaN/Inf element makes the sum of squares non-finite (float32 squares cannot
        # overflow float64), so the full finiteness scan only runs when the sum says so.
        non_finite = not math.isfinite(norm) and not all_finite(tensors)
        if non_finite:
            norm = float("nan")
        zeroed = clipped = False
        if not non_finite and self._zeroing_norm > 0.0:
            zeroed = dp.global_linf_norm(tensors) > self._zeroing_norm
        if not (non_finite or zeroed) and self._clip is not None:
            if not math.isfinite(norm):
                raise ValueError("The update's L2 norm overflows float64; it cannot be clipped.")
            clipped = norm > self._clip
        if self._threshold is not None:
            # A zeroed (or non-finite, hence zeroed) record reaches the query as zeros.
            effective_norm = 0.0 if (non_finite or zeroed) else norm
            self.below_threshold_count += int(effective_norm <= self._threshold)
        if not (non_finite or zeroed):  # a zeroed record adds zeros: nothing to do
            scale = self._clip / norm if clipped and self._clip is not None else None
            _add_scaled(self._sum, tensors, scale)
        self._add_metrics(update)
        self.num_updates += 1
        self.num_examples += metrics.bounded_examples(update.num_examples)
        self.non_finite_count += int(non_finite)
        self.zeroed_count += int(zeroed)
        self.clipped_count += int(clipped)
        return AddResult(l2_norm=norm, non_finite=non_finite, zeroed=zeroed, clipped=clipped)

    def _check_shapes(self, update: ClientUpdate) -> None:
        if len(update.trainable) != len(self._shapes):
            raise ValueError(
                f"Update has {len(update.trainable)} trainable tensors, "
                f"the plan has {len(self._shapes)}."
            )
        for i, (tensor, shape) in enumerate(zip(update.trainable, self._shapes, strict=True)):
            if tensor.shape != shape:
                raise ValueError(f"trainable/{i} has shape {tensor.shape}, expected {shape}.")
        if set(update.metrics) != set(self._metric_specs):
            raise ValueError(
                f"Update reports metrics {sorted(update.metrics)}, "
                f"the plan has {sorted(self._metric_specs)}."
            )

    def _add_metrics(self, update: ClientUpdate) -> None:
        for name, spec in self._metric_specs.items():
            state = metrics.flatten_state(update.metrics[name])
            if state.size != self._metric_sums[name].size:
                raise ValueError(
                    f"Metric {name!r} state has {state.size} elements, "
                    f"expected {self._metric_sums[name].size}."
                )
            # Defence in depth, as for the update: a non-finite state contributes nothing.
            state = np.where(np.isfinite(state), state, 0.0)
            self._metric_sums[name] += metrics.clamp_state(spec, state, update.num_examples)

    def below_threshold(self) -> int | None:
        """Returns the below-threshold count for the query, None when it does not adapt."""
        return None if self._threshold is None else self.below_threshold_count

    def update_sum(self) -> Tensors:
        """Returns a copy of the sum of the processed updates (float64)."""
        return tuple(t.copy() for t in self._sum)

    def metric_sums(self) -> dict[str, metrics.FloatArray]:
        """Returns copies of the summed, flattened metric states by metric name."""
        return {name: s.copy() for name, s in self._metric_sums.items()}
