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
import functools
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


def _keras(
    cls: Callable[..., tf.keras.metrics.Metric], name: str, **kwargs: object
) -> Callable[[], tf.keras.metrics.Metric]:
    return functools.partial(cls, name=name, **kwargs)


def _share(name: str, cls: Callable[..., tf.keras.metrics.Metric]) -> tuple[str, MetricKind]:
    # A share of examples (the accuracies): in [0, 1], each example adds at most one.
    return name, MetricKind(_keras(cls, name), _Finalizer.RATIO, bounded=True, value_range=_UNIT)


def _mean_loss(
    name: str,
    cls: Callable[..., tf.keras.metrics.Metric],
    finalizer: int = _Finalizer.RATIO,
    **kwargs: object,
) -> tuple[str, MetricKind]:
    # A mean of a non-negative per-example loss or error.
    return name, MetricKind(_keras(cls, name, **kwargs), finalizer, value_range=_NON_NEGATIVE)


ALLOWLIST: dict[str, MetricKind] = dict(
    [
        ("auc-roc", MetricKind(_keras(_K.AUC, "auc-roc"), _Finalizer.AUC_ROC, _AUC_ORDER, True)),
        (
            "auc-pr",
            MetricKind(_keras(_K.AUC, "auc-pr", curve="PR"), _Finalizer.AUC_PR, _AUC_ORDER, True),
        ),
        _share("accuracy", _K.Accuracy),
        _share("binary_accuracy", _K.BinaryAccuracy),
        _share("categorical_accuracy", _K.CategoricalAccuracy),
        _share("sparse_categorical_accuracy", _K.SparseCategoricalAccuracy),
        _mean_loss("binary_crossentropy", _K.BinaryCrossentropy),
        _mean_loss("binary_crossentropy_from_logits", _K.BinaryCrossentropy, from_logits=True),
        _mean_loss("categorical_crossentropy", _K.CategoricalCrossentropy),
        _mean_loss(
            "categorical_crossentropy_from_logits", _K.CategoricalCrossentropy, from_logits=True
        ),
        _mean_loss("sparse_categorical_crossentropy", _K.SparseCategoricalCrossentropy),
        _mean_loss(
            "sparse_categorical_crossentropy_from_logits",
            _K.SparseCategoricalCrossentropy,
            from_logits=True,
        ),
        _mean_loss("mean_absolute_error", _K.MeanAbsoluteError),
        _mean_loss("mean_absolute_percentage_error", _K.MeanAbsolutePercentageError),
        _mean_loss("mean_squared_error", _K.MeanSquaredError),
        _mean_loss("mean_squared_logarithmic_error", _K.MeanSquaredLogarithmicError),
        _mean_loss("root_mean_squared_error", _K.RootMeanSquaredError, _Finalizer.SQRT_RATIO),
        ("mean", MetricKind(_mean_of_predictions, _Finalizer.RATIO)),
        (
            "precision",
            MetricKind(_keras(_K.Precision, "precision"), _Finalizer.PRECISION, (0, 1), True),
        ),
        ("recall", MetricKind(_keras(_K.Recall, "recall"), _Finalizer.RECALL, (0, 1), True)),
    ]
)


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
