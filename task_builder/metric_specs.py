"""Metrics of a task: the ODP allowlist, their functional TFF form and their plan MetricSpecs.

ODP's task builder (`metrics_utils.py`) accepts 20 Keras metric names and always adds a `loss`
metric weighted by the number of examples (TFF `model_from_functional`: state
`[loss * num_examples, num_examples]`). Devices report each metric's *state* (sums that add up
across batches and devices); the server sums them and applies the `MetricSpec.Finalizer`, the
same sum-then-finalize TFF uses (`tff.learning.metrics.sum_then_finalize`). Each spec also
bounds what one device may report: `max_state_per_example` for counts, and `value_range` for
what a mean averages (accuracies in [0, 1], crossentropies and errors >= 0), which the server
enforces on each device's numerator before summing.
"""

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf
import tensorflow_federated as tff

from fcp_server.protos import plan_pb2

LOSS_METRIC = "loss"

_Finalizer = plan_pb2.MetricSpec.Finalizer
_Range = plan_pb2.MetricSpec.ValueRange


@dataclasses.dataclass(frozen=True)
class MetricKind:
    """How one allowlisted metric is built, reported and finalized."""

    # Builds the Keras metric (state = its variables, in creation order).
    constructor: Callable[[], tf.keras.metrics.Metric]
    finalizer: int
    # Canonical state order of the plan (MetricSpec comment) as indices into the Keras
    # variables: AUC keeps [tp, tn, fp, fn], the plan wants [tp, fp, tn, fn].
    state_order: tuple[int, ...] = (0, 1)
    # True when every state element grows by at most one per prediction element.
    bounded: bool = False
    # What a RATIO / SQRT_RATIO averages; the server bounds each device's numerator by it.
    value_range: int = _Range.VALUE_RANGE_UNSPECIFIED


def _mean_of_predictions() -> tf.keras.metrics.Metric:
    # Keras `Mean.update_state` takes no y_true, so "mean" is the mean of the predictions,
    # fed through the (y_true, y_pred) interface TFF's functional metrics use.
    return tf.keras.metrics.MeanMetricWrapper(fn=lambda y_true, y_pred: y_pred, name="mean")


_K = tf.keras.metrics
_AUC_ORDER = (0, 2, 1, 3)
_UNIT = _Range.UNIT_INTERVAL
_NON_NEGATIVE = _Range.NON_NEGATIVE

ALLOWLIST: dict[str, MetricKind] = {
    "auc-roc": MetricKind(lambda: _K.AUC(name="auc-roc"), _Finalizer.AUC_ROC, _AUC_ORDER, True),
    "auc-pr": MetricKind(
        lambda: _K.AUC(curve="PR", name="auc-pr"), _Finalizer.AUC_PR, _AUC_ORDER, True
    ),
    "accuracy": MetricKind(
        lambda: _K.Accuracy(name="accuracy"), _Finalizer.RATIO, bounded=True, value_range=_UNIT
    ),
    "binary_accuracy": MetricKind(
        lambda: _K.BinaryAccuracy(name="binary_accuracy"),
        _Finalizer.RATIO,
        bounded=True,
        value_range=_UNIT,
    ),
    "binary_crossentropy": MetricKind(
        lambda: _K.BinaryCrossentropy(name="binary_crossentropy"),
        _Finalizer.RATIO,
        value_range=_NON_NEGATIVE,
    ),
    "binary_crossentropy_from_logits": MetricKind(
        lambda: _K.BinaryCrossentropy(from_logits=True, name="binary_crossentropy_from_logits"),
        _Finalizer.RATIO,
        value_range=_NON_NEGATIVE,
    ),
    "categorical_accuracy": MetricKind(
        lambda: _K.CategoricalAccuracy(name="categorical_accuracy"),
        _Finalizer.RATIO,
        bounded=True,
        value_range=_UNIT,
    ),
    "categorical_crossentropy": MetricKind(
        lambda: _K.CategoricalCrossentropy(name="categorical_crossentropy"),
        _Finalizer.RATIO,
        value_range=_NON_NEGATIVE,
    ),
    "categorical_crossentropy_from_logits": MetricKind(
        lambda: _K.CategoricalCrossentropy(
            from_logits=True, name="categorical_crossentropy_from_logits"
        ),
        _Finalizer.RATIO,
        value_range=_NON_NEGATIVE,
    ),
    "mean": MetricKind(_mean_of_predictions, _Finalizer.RATIO),
    "mean_absolute_error": MetricKind(
        lambda: _K.MeanAbsoluteError(name="mean_absolute_error"),
        _Finalizer.RATIO,
        value_range=_NON_NEGATIVE,
    ),
    "mean_absolute_percentage_error": MetricKind(
        lambda: _K.MeanAbsolutePercentageError(name="mean_absolute_percentage_error"),
        _Finalizer.RATIO,
        value_range=_NON_NEGATIVE,
    ),
    "mean_squared_error": MetricKind(
        lambda: _K.MeanSquaredError(name="mean_squared_error"),
        _Finalizer.RATIO,
        value_range=_NON_NEGATIVE,
    ),
    "mean_squared_logarithmic_error": MetricKind(
        lambda: _K.MeanSquaredLogarithmicError(name="mean_squared_logarithmic_error"),
        _Finalizer.RATIO,
        value_range=_NON_NEGATIVE,
    ),
    "precision": MetricKind(
        lambda: _K.Precision(name="precision"), _Finalizer.PRECISION, (0, 1), True
    ),
    "recall": MetricKind(lambda: _K.Recall(name="recall"), _Finalizer.RECALL, (0, 1), True),
    "root_mean_squared_error": MetricKind(
        lambda: _K.RootMeanSquaredError(name="root_mean_squared_error"),
        _Finalizer.SQRT_RATIO,
        value_range=_NON_NEGATIVE,
    ),
    "sparse_categorical_accuracy": MetricKind(
        lambda: _K.SparseCategoricalAccuracy(name="sparse_categorical_accuracy"),
        _Finalizer.RATIO,
        bounded=True,
        value_range=_UNIT,
    ),
    "sparse_categorical_crossentropy": MetricKind(
        lambda: _K.SparseCategoricalCrossentropy(name="sparse_categorical_crossentropy"),
        _Finalizer.RATIO,
        value_range=_NON_NEGATIVE,
    ),
    "sparse_categorical_crossentropy_from_logits": MetricKind(
        lambda: _K.SparseCategoricalCrossentropy(
            from_logits=True, name="sparse_categorical_crossentropy_from_logits"
        ),
        _Finalizer.RATIO,
        value_range=_NON_NEGATIVE,
    ),
}


def split_metric_names(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits requested metric names into (accepted, rejected), keeping order, no duplicates.

    `loss` is always reported, so asking for it is accepted but adds nothing.
    """
    accepted: list[str] = []
    rejected: list[str] = []
    for name in names:
        if name == LOSS_METRIC or name in accepted or name in rejected:
            continue
        (accepted if name in ALLOWLIST else rejected).append(name)
    return accepted, rejected


def _keras_constructors(names: Sequence[str]) -> "collections.OrderedDict[str, Any]":
    return collections.OrderedDict((name, ALLOWLIST[name].constructor) for name in names)


def build_metric_fns(names: Sequence[str]) -> tuple[Any, Any, Any]:
    """TFF functional metric fns: `loss` (weighted by num_examples) plus the named metrics.

    The state is an OrderedDict `{"loss": (loss_sum, num_examples), name: keras vars, ...}`,
    as `tff.learning.models.model_from_functional` reports it.

    Args:
        names: Accepted metric names (see `split_metric_names`).

    Returns:
        `(initialize, update, finalize)` tf.functions for `tff.learning.models.FunctionalModel`.
    """
    keras_init, keras_update, keras_finalize = (None, None, None)
    if names:
        keras_init, keras_update, keras_finalize = (
            tff.learning.metrics.create_functional_metric_fns(_keras_constructors(names))
        )

    def initialize() -> Any:
        state: collections.OrderedDict[str, Any] = collections.OrderedDict()
        state[LOSS_METRIC] = (tf.constant(0.0), tf.constant(0.0))
        if keras_init is not None:
            state.update(keras_init())
        return state

    def update(state: Any, labels: Any, batch_output: Any, sample_weight: Any = None) -> Any:
        del sample_weight  # Sample weights are not supported (as functional_model_from_keras).
        num = tf.cast(batch_output.num_examples, tf.float32)
        loss_sum, count = state[LOSS_METRIC]
        new_state: collections.OrderedDict[str, Any] = collections.OrderedDict()
        new_state[LOSS_METRIC] = (loss_sum + batch_output.loss * num, count + num)
        if keras_update is not None:
            keras_state = collections.OrderedDict((n, state[n]) for n in names)
            new_state.update(keras_update(keras_state, labels, batch_output))
        return new_state

    def finalize(state: Any) -> Any:
        loss_sum, count = state[LOSS_METRIC]
        out: collections.OrderedDict[str, Any] = collections.OrderedDict()
        out[LOSS_METRIC] = tf.math.divide_no_nan(loss_sum, count)
        if keras_finalize is not None:
            out.update(keras_finalize(collections.OrderedDict((n, state[n]) for n in names)))
        return out

    return tf.function(initialize), tf.function(update), tf.function(finalize)


def with_metrics(
    model: tff.learning.models.FunctionalModel, names: Sequence[str]
) -> tff.learning.models.FunctionalModel:
    """The same model with `loss` plus the named metrics installed (ODP overwrites them too)."""
    return tff.learning.models.FunctionalModel(
        initial_weights=model.initial_weights,
        predict_on_batch_fn=model.predict_on_batch,
        loss_fn=model.loss,
        metrics_fns=build_metric_fns(names),
        input_spec=model.input_spec,
    )


def metric_state_shapes(names: Sequence[str]) -> dict[str, list[tuple[int, ...]]]:
    """Shapes of each metric's state tensors in the plan's canonical order (loss first)."""
    shapes: dict[str, list[tuple[int, ...]]] = {LOSS_METRIC: [(), ()]}
    with tf.Graph().as_default():
        for name in names:
            kind = ALLOWLIST[name]
            variables = kind.constructor().variables
            shapes[name] = [tuple(variables[i].shape.as_list()) for i in kind.state_order]
    return shapes


def thresholds_of(name: str) -> list[float]:
    """Thresholds of a confusion-matrix metric (AUC, precision, recall); [] for the others."""
    if name == LOSS_METRIC:
        return []
    with tf.Graph().as_default():
        metric = ALLOWLIST[name].constructor()
        values = getattr(metric, "thresholds", None)
        return [float(t) for t in values] if values is not None else []


def canonical_state(name: str, keras_state: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Reorders a metric's Keras variables into the plan's state order."""
    if name == LOSS_METRIC:
        return list(keras_state)
    return [keras_state[i] for i in ALLOWLIST[name].state_order]


def build_metric_specs(names: Sequence[str], prediction_size: int) -> list[plan_pb2.MetricSpec]:
    """MetricSpecs for the plan: `loss` first, then the accepted metrics in config order.

    Args:
        names: Accepted metric names.
        prediction_size: Prediction elements per example (bounds count-like states).

    Returns:
        One MetricSpec per metric; state tensors are named `metric/<name>/<k>`.
    """
    specs = []
    shapes = metric_state_shapes(names)
    for name in [LOSS_METRIC, *names]:
        spec = plan_pb2.MetricSpec(name=name)
        if name == LOSS_METRIC:
            spec.finalizer = _Finalizer.RATIO
        else:
            kind = ALLOWLIST[name]
            spec.finalizer = kind.finalizer  # type: ignore[assignment]
            spec.value_range = kind.value_range  # type: ignore[assignment]
            spec.thresholds.extend(thresholds_of(name))
            if kind.bounded:
                spec.max_state_per_example = float(prediction_size)
        for k, shape in enumerate(shapes[name]):
            spec.state.add(name=f"metric/{name}/{k}", shape=list(shape), dtype="float32")
        specs.append(spec)
    return specs
