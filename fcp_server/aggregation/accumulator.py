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
4. added to a running sum in the tensors' dtype (float32), as TFF's `federated_sum` does; the
   norm and the clipped add are `update_norms`' kernels (one memory pass each).

Zeroed records still count as records, as in TFF. Metric state is summed alongside, after
per-device clamping (see `metrics.clamp_state`). For an EVALUATION plan only metric state is
accumulated (`fedavg.finalize_evaluation`).
"""

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from fcp_server.aggregation import dp, gaussian_noise, metrics, queries, update_norms
from fcp_server.aggregation.state import ClientUpdate, Tensor, Tensors
from fcp_server.protos import plan_pb2


@dataclasses.dataclass(frozen=True)
class AddResult:
    """What happened to one update when it was added."""

    # Global L2 norm of the update as received (NaN if it was non-finite).
    l2_norm: float
    non_finite: bool
    zeroed: bool
    clipped: bool


class RoundAccumulator:
    """Running sums of one round; holds one sum array per tensor, never the updates."""

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
        model = [] if evaluation else list(plan.model.trainable)
        self._shapes = [tuple(t.shape) for t in model]
        # What the noised mean is rounded to: the weights' dtypes (`finalize_round` casts
        # to them), float64 for a non-floating weight.
        self._dtypes = [
            d if np.issubdtype(d, np.floating) else np.dtype(np.float64)
            for d in (np.dtype(t.dtype) for t in model)
        ]
        dtypes = {update_norms.sum_dtype(np.dtype(t.dtype)) for t in model}
        # The sums live in one flat array (when they share a dtype) so that an update whose
        # tensors lie back to back in the same order is added in one pass
        # (`ClientUpdate.trainable_flat`); `_sum` views it per tensor.
        self._flat_sum = (
            update_norms.zeroed_sum(sum(math.prod(s) for s in self._shapes), dtypes.pop())
            if len(dtypes) == 1
            else None
        )
        self._flat_order = tuple(range(len(model)))
        self._sum = (
            _tensor_views(self._flat_sum, self._shapes, self._flat_order)
            if self._flat_sum is not None
            else [
                np.zeros(s, dtype=update_norms.sum_dtype(np.dtype(t.dtype)))
                for s, t in zip(self._shapes, model, strict=True)
            ]
        )
        self._summed = False
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
        self._normals: gaussian_noise.PrefetchedNormals | None = None

    def start_noise(self, rng: np.random.Generator) -> None:
        """Starts drawing the query's noise from `rng` while the updates are being added.

        The Gaussian queries' noise does not depend on the updates, so its draw (compute
        bound, in the noise threads) can overlap reading and summing them (memory bound).
        The result is bit-identical to drawing it in `finalize_round`, which must get the
        same `rng`. Does nothing for queries without per-element noise.

        Raises:
            ValueError: If the noise was started already.
        """
        if self._normals is not None:
            raise ValueError("The round's noise was started already.")
        if self.query.noises_sum():
            self._normals = gaussian_noise.prefetch_normals(self._shapes, rng, self._dtypes)

    def prefetched_noise(self) -> gaussian_noise.PrefetchedNormals | None:
        """Returns the noise draws `start_noise` began, or None."""
        return self._normals

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
        # NaN exactly when an element is NaN/Inf: the norm doubles as the finiteness scan.
        squares = update.sum_of_squares
        norm = math.sqrt(update_norms.sum_of_squares(tensors) if squares is None else squares)
        non_finite = math.isnan(norm)
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
            self._add_trainable(update, scale)
        self._add_metrics(update)
        self.num_updates += 1
        self.num_examples += metrics.bounded_examples(update.num_examples)
        self.non_finite_count += int(non_finite)
        self.zeroed_count += int(zeroed)
        self.clipped_count += int(clipped)
        return AddResult(l2_norm=norm, non_finite=non_finite, zeroed=zeroed, clipped=clipped)

    def _add_trainable(self, update: ClientUpdate, scale: float | None) -> None:
        flat, total = update.trainable_flat, self._flat_sum
        if flat is None or total is None:
            self._summed = True
            update_norms.add_scaled(self._sum, update.trainable, scale)
            return
        if flat.shape != total.shape:
            raise ValueError(f"Flat update has {flat.size} elements, the model {total.size}.")
        if not self._summed:
            # Nothing summed yet (all zeros): lay the sums out as this update's tensors lie.
            self._sum = _tensor_views(total, self._shapes, update.flat_order)
            self._flat_order = update.flat_order
        self._summed = True
        if update.flat_order == self._flat_order:
            update_norms.add_scaled((total,), (flat,), scale)
        else:
            update_norms.add_scaled(self._sum, update.trainable, scale)

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
        """Returns the sum of the processed updates as float64 copies."""
        return tuple(t.astype(np.float64) for t in self._sum)

    def update_sum_view(self) -> Tensors:
        """Returns read-only views of the sum in its own dtype (float32 for float32 models).

        What the queries take: they compute in float64, and reading the float32 sum into a
        float64 operation is exact, so no float64 copy of the model is made.
        """
        views = tuple(t.view() for t in self._sum)
        for view in views:
            view.flags.writeable = False
        return views

    def metric_sums(self) -> dict[str, metrics.FloatArray]:
        """Returns copies of the summed, flattened metric states by metric name."""
        return {name: s.copy() for name, s in self._metric_sums.items()}


def _tensor_views(
    flat: Tensor, shapes: list[tuple[int, ...]], order: tuple[int, ...]
) -> list[Tensor]:
    """Views of `flat` for each shape, laid out back to back in `order` (model positions).

    Raises:
        ValueError: If `order` is not a permutation of the positions.
    """
    if sorted(order) != list(range(len(shapes))):
        raise ValueError(f"Flat tensor order {order} is not a permutation of the model's.")
    views: dict[int, Tensor] = {}
    start = 0
    for position in order:
        size = math.prod(shapes[position])
        views[position] = flat[start : start + size].reshape(shapes[position])
        start += size
    return [views[p] for p in range(len(shapes))]
