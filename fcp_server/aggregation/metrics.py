"""Bounds and finalizes the training metrics devices report as summable state.

As in TFF's `tff.learning.metrics` (finalizers applied to the sum of per-client unfinalized
Keras metric variables), each device reports metric *state* (e.g. [total, count] or per-threshold
confusion counts), the server sums it and applies `MetricSpec.Finalizer` once per round. The
finalizers reproduce Keras 2.14: `divide_no_nan` (0/0 -> 0) everywhere, and `tf.keras.metrics.AUC`'s
default `summation_method="interpolation"` (trapezoids for ROC; the Davis & Goadrich 2006
interpolation for PR).

A metric's state is read as the concatenation of its flattened state tensors in
`MetricSpec.state` order, so "two scalars" and "one tensor of shape [2]" mean the same; AUC state
is [tp, fp, tn, fn], each with one element per threshold.

Per-device bounds: metric state is not privatised, so each device's contribution is clamped to
[0, bound] (a RATIO numerator, a sum that may be negative, to [-bound, bound]) before it is
summed, with bound = min(max_state_per_example * num_examples, MAX_STATE_PER_DEVICE). The
ceiling is TFF's default secure-sum range for metric values (`secure_sum_then_finalize`,
upper bound 2**20 - 1) and also applies to metrics with `max_state_per_example` = 0 (losses),
so one hostile device can move a finalized metric only as far as one bounded state can.
Two consistency bounds keep a finalized metric inside its range whatever one device reports:
a RATIO / SQRT_RATIO numerator is kept within `MetricSpec.value_range` times the device's
count (an accuracy's correct predictions cannot exceed its predictions), and AUC counts are
projected onto a confusion curve some data could produce (`confusion_curve`).
"""

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from fcp_server.aggregation.state import Tensor
from fcp_server.protos import plan_pb2

Finalizer = plan_pb2.MetricSpec.Finalizer
ValueRange = plan_pb2.MetricSpec.ValueRange
FloatArray = NDArray[np.float64]

# Elements each finalizer reads (AUC: 4 per threshold, checked separately).
_STATE_SIZES = {
    Finalizer.RATIO: 2,
    Finalizer.SQRT_RATIO: 2,
    Finalizer.PRECISION: 2,
    Finalizer.RECALL: 2,
    Finalizer.SUM: 1,
}
_AUC = (Finalizer.AUC_ROC, Finalizer.AUC_PR)
# Largest value any element of one device's metric state (or its num_examples) contributes.
MAX_STATE_PER_DEVICE = float(2**20 - 1)


def flatten_state(state: Sequence[Tensor]) -> FloatArray:
    """Returns the metric state tensors flattened and concatenated, as float64."""
    if not state:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.ravel(t).astype(np.float64) for t in state])


def state_size(spec: plan_pb2.MetricSpec) -> int:
    """Returns the number of state elements the spec declares.

    Raises:
        ValueError: If a state shape has a negative dimension.
    """
    total = 0
    for tensor in spec.state:
        if any(d < 0 for d in tensor.shape):
            raise ValueError(f"Metric {spec.name!r} state {tensor.name!r} has an unknown shape.")
        total += math.prod(tensor.shape)
    return total


def validate_metric_spec(spec: plan_pb2.MetricSpec) -> None:
    """Checks that the finalizer can read the declared state.

    Raises:
        ValueError: Naming the metric, if the finalizer is unknown or the state has the wrong
            number of elements.
    """
    size = state_size(spec)
    if spec.finalizer in _STATE_SIZES:
        if size != _STATE_SIZES[spec.finalizer]:
            raise ValueError(
                f"Metric {spec.name!r} ({Finalizer.Name(spec.finalizer)}) needs "
                f"{_STATE_SIZES[spec.finalizer]} state elements, the plan declares {size}."
            )
    elif spec.finalizer in _AUC:
        thresholds = len(spec.thresholds) or size // 4
        if thresholds < 2 or size != 4 * thresholds:
            raise ValueError(
                f"Metric {spec.name!r} ({Finalizer.Name(spec.finalizer)}) needs [tp, fp, tn, fn] "
                f"for >= 2 thresholds; the plan declares {size} elements and "
                f"{len(spec.thresholds)} thresholds."
            )
    else:
        raise ValueError(f"Metric {spec.name!r} has an unknown finalizer {spec.finalizer}.")
    if not (math.isfinite(spec.max_state_per_example) and spec.max_state_per_example >= 0.0):
        raise ValueError(
            f"Metric {spec.name!r} max_state_per_example must be >= 0, "
            f"found {spec.max_state_per_example}."
        )


def clamp_state(spec: plan_pb2.MetricSpec, state: FloatArray, num_examples: int) -> FloatArray:
    """Bounds one device's flattened metric state (see the module docstring).

    Args:
        spec: The metric.
        state: The device's flattened state (`flatten_state`).
        num_examples: Examples the device reported.

    Returns:
        The clamped state (a new array).
    """
    bound = MAX_STATE_PER_DEVICE
    if spec.max_state_per_example > 0.0:
        bound = min(bound, spec.max_state_per_example * max(num_examples, 0))
    lower = np.zeros_like(state)
    if spec.finalizer == Finalizer.RATIO and state.size:
        lower[0] = -bound
    clamped = np.clip(state, lower, bound)
    if spec.finalizer in _AUC and clamped.size % 4 == 0:
        return confusion_curve(clamped, bound)
    if spec.finalizer in (Finalizer.RATIO, Finalizer.SQRT_RATIO) and clamped.size == 2:
        if spec.value_range == ValueRange.NON_NEGATIVE:
            clamped[0] = max(clamped[0], 0.0)
        elif spec.value_range == ValueRange.UNIT_INTERVAL:
            clamped[0] = min(max(clamped[0], 0.0), clamped[1])
    return clamped


def confusion_curve(state: FloatArray, bound: float) -> FloatArray:
    """Projects one device's AUC state onto a confusion curve that some data could produce.

    Over Keras' ascending thresholds, real [tp, fp, tn, fn] counts keep the positives tp + fn
    and the negatives fp + tn constant and never increase tp or fp. A sum of such curves is one,
    so its AUC is in [0, 1]; a curve that zig-zags across thresholds is not, and could push the
    trapezoid sum outside [0, 1] by far more than the device's share. Real curves are returned
    unchanged.

    Args:
        state: [tp, fp, tn, fn] per threshold, flattened, already clamped to [0, bound].
        bound: Most positives (and most negatives) the device may have counted.

    Returns:
        The projected state (a new array).
    """
    tp, fp, tn, fn = state.reshape(4, -1)
    # Totals from the lowest threshold, where every prediction counts as positive.
    positives = min(tp[0] + fn[0], bound)
    negatives = min(fp[0] + tn[0], bound)
    tp = np.minimum.accumulate(np.minimum(tp, positives))
    fp = np.minimum.accumulate(np.minimum(fp, negatives))
    return np.concatenate([tp, fp, negatives - fp, positives - tp])


def bounded_examples(num_examples: int) -> int:
    """One device's num_examples as it enters the round's example count: in [0, ceiling]."""
    return min(max(num_examples, 0), int(MAX_STATE_PER_DEVICE))


def divide_no_nan(x: FloatArray | float, y: FloatArray | float) -> FloatArray:
    """Returns x / y with 0 where y == 0 (Keras/TF `tf.math.divide_no_nan`)."""
    num = np.asarray(x, dtype=np.float64)
    den = np.asarray(y, dtype=np.float64)
    safe = np.where(den == 0.0, 1.0, den)
    return np.where(den == 0.0, 0.0, num / safe)


def auc_roc(tp: FloatArray, fp: FloatArray, tn: FloatArray, fn: FloatArray) -> float:
    """Area under the ROC curve as `tf.keras.metrics.AUC(curve="ROC")` (interpolation).

    Args:
        tp: True positives per threshold, thresholds ascending (as Keras orders them).
        fp: False positives per threshold.
        tn: True negatives per threshold.
        fn: False negatives per threshold.
    """
    recall = divide_no_nan(tp, tp + fn)
    fp_rate = divide_no_nan(fp, fp + tn)
    heights = (recall[:-1] + recall[1:]) / 2.0
    return float(np.sum((fp_rate[:-1] - fp_rate[1:]) * heights))


def auc_pr(tp: FloatArray, fp: FloatArray, fn: FloatArray) -> float:
    """Area under the precision-recall curve as `tf.keras.metrics.AUC(curve="PR")`.

    Keras' closed-form interpolation (Davis & Goadrich 2006, section 4): TP and P = TP + FP vary
    linearly between thresholds and each interval adds
    `slope * (dTP + intercept * log(P_A / P_B)) / (TP_B + FN_B)`.

    Args:
        tp: True positives per threshold, thresholds ascending.
        fp: False positives per threshold.
        fn: False negatives per threshold.
    """
    dtp = tp[:-1] - tp[1:]
    p = tp + fp
    dp = p[:-1] - p[1:]
    slope = divide_no_nan(dtp, np.maximum(dp, 0.0))
    intercept = tp[1:] - slope * p[1:]
    both_positive = (p[:-1] > 0) & (p[1:] > 0)
    ratio = np.where(both_positive, divide_no_nan(p[:-1], np.maximum(p[1:], 0.0)), 1.0)
    # log(1) = 0 where the ratio was replaced, so no warning is raised for log(0).
    log_ratio = np.log(np.where(ratio > 0.0, ratio, 1.0))
    increments = divide_no_nan(
        slope * (dtp + intercept * log_ratio), np.maximum(tp[1:] + fn[1:], 0.0)
    )
    return float(np.sum(increments))


def finalize_metric(spec: plan_pb2.MetricSpec, state: FloatArray) -> float:
    """Returns the metric's value from its summed, flattened state.

    Args:
        spec: The metric (validated with `validate_metric_spec`).
        state: Sum over devices of the flattened state.

    Raises:
        ValueError: If the state does not fit the finalizer.
    """
    validate_metric_spec(spec)
    if state.size != state_size(spec):
        raise ValueError(
            f"Metric {spec.name!r} state has {state.size} elements, expected {state_size(spec)}."
        )
    kind = spec.finalizer
    if kind == Finalizer.RATIO:
        return float(divide_no_nan(state[0], state[1]))
    if kind == Finalizer.SQRT_RATIO:
        return math.sqrt(float(divide_no_nan(state[0], state[1])))
    if kind in (Finalizer.PRECISION, Finalizer.RECALL):
        return float(divide_no_nan(state[0], state[0] + state[1]))
    if kind == Finalizer.SUM:
        return float(state[0])
    tp, fp, tn, fn = state.reshape(4, -1)
    if kind == Finalizer.AUC_ROC:
        return auc_roc(tp, fp, tn, fn)
    return auc_pr(tp, fp, fn)
