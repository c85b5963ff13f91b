"""Models, data and independent Keras references for the metric-equivalence tests.

Every allowlisted metric is assigned to a model whose output it is meant for (binary or
multiclass classifiers with probabilities or logits, one-hot or sparse labels, regressors with
positive targets). The references are written out here from the reference allowlist (ODP
`common.METRICS_ALLOWLIST`) rather than read from the builder's table, so a wrong builder
constructor shows up as a wrong value.
"""

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

NUM_FEATURES = 4
NUM_CLASSES = 3
# Examples per simulated device: uneven, one device with a single example, several with a
# partial last batch at BATCH_SIZE.
CLIENT_SIZES = (1, 2, 5, 9, 14, 23)
BATCH_SIZE = 4

_K = tf.keras.metrics


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One model, its data and the allowlisted metrics evaluated on it."""

    name: str
    # seed -> Keras model reading `x` of shape [None, NUM_FEATURES].
    keras_model: Callable[[int], tf.keras.Model]
    loss: Callable[[], tf.keras.losses.Loss]
    label_spec: tf.TensorSpec
    # (rng, n) -> n labels shaped as label_spec.
    labels: Callable[[np.random.Generator, int], np.ndarray]
    metrics: tuple[str, ...]


def _init(seed: int) -> tf.keras.initializers.Initializer:
    return tf.keras.initializers.GlorotUniform(seed=seed)


def _dense(units: int, activation: object = None) -> Callable[[int], tf.keras.Model]:
    def build(seed: int) -> tf.keras.Model:
        inputs = tf.keras.Input(shape=(NUM_FEATURES,), name="x")
        hidden = tf.keras.layers.Dense(6, activation="tanh", kernel_initializer=_init(seed))(inputs)
        outputs = tf.keras.layers.Dense(
            units,
            activation=activation,
            kernel_initializer=_init(seed + 1),
            bias_initializer=tf.keras.initializers.Constant(0.3),
        )(hidden)
        return tf.keras.Model(inputs, outputs)

    return build


def _rounded(seed: int) -> tf.keras.Model:
    # Integer-valued predictions, so that `accuracy` (exact equality) is neither 0 nor 1.
    inputs = tf.keras.Input(shape=(NUM_FEATURES,), name="x")
    scaled = tf.keras.layers.Dense(1, kernel_initializer=_init(seed))(inputs)
    return tf.keras.Model(inputs, tf.math.round(scaled))


def _binary(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2, size=(n, 1)).astype(np.float32)


def _one_hot(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, size=n)]


def _sparse(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, NUM_CLASSES, size=n).astype(np.int64)


def _small_ints(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(-1, 2, size=(n, 1)).astype(np.float32)


def _positive(rng: np.random.Generator, n: int) -> np.ndarray:
    # Positive targets: MAPE divides by |y|, MSLE takes log(1 + y).
    return rng.lognormal(0.0, 0.7, size=(n, 1)).astype(np.float32)


_COLUMN = tf.TensorSpec([None, 1], tf.float32)
_ONE_HOT = tf.TensorSpec([None, NUM_CLASSES], tf.float32)
_SPARSE = tf.TensorSpec([None], tf.int64)
_L = tf.keras.losses

CASES: tuple[ModelCase, ...] = (
    ModelCase(
        "binary_probabilities",
        _dense(1, "sigmoid"),
        _L.BinaryCrossentropy,
        _COLUMN,
        _binary,
        ("auc-roc", "auc-pr", "binary_accuracy", "binary_crossentropy", "precision", "recall"),
    ),
    ModelCase(
        "binary_logits",
        _dense(1),
        lambda: _L.BinaryCrossentropy(from_logits=True),
        _COLUMN,
        _binary,
        ("binary_crossentropy_from_logits",),
    ),
    ModelCase(
        "one_hot_probabilities",
        _dense(NUM_CLASSES, "softmax"),
        _L.CategoricalCrossentropy,
        _ONE_HOT,
        _one_hot,
        ("categorical_accuracy", "categorical_crossentropy"),
    ),
    ModelCase(
        "one_hot_logits",
        _dense(NUM_CLASSES),
        lambda: _L.CategoricalCrossentropy(from_logits=True),
        _ONE_HOT,
        _one_hot,
        ("categorical_crossentropy_from_logits",),
    ),
    ModelCase(
        "sparse_probabilities",
        _dense(NUM_CLASSES, "softmax"),
        _L.SparseCategoricalCrossentropy,
        _SPARSE,
        _sparse,
        ("sparse_categorical_accuracy", "sparse_categorical_crossentropy"),
    ),
    ModelCase(
        "sparse_logits",
        _dense(NUM_CLASSES),
        lambda: _L.SparseCategoricalCrossentropy(from_logits=True),
        _SPARSE,
        _sparse,
        ("sparse_categorical_crossentropy_from_logits",),
    ),
    ModelCase(
        "rounded_regression",
        _rounded,
        _L.MeanSquaredError,
        _COLUMN,
        _small_ints,
        ("accuracy",),
    ),
    ModelCase(
        "positive_regression",
        _dense(1, "softplus"),
        _L.MeanSquaredError,
        _COLUMN,
        _positive,
        (
            "mean",
            "mean_absolute_error",
            "mean_absolute_percentage_error",
            "mean_squared_error",
            "mean_squared_logarithmic_error",
            "root_mean_squared_error",
        ),
    ),
)


def _mean_of_predictions(labels: tf.Tensor, predictions: tf.Tensor) -> float:
    # FCP's `mean` is the mean of the predictions (Keras `Mean` has no y_true argument).
    del labels
    metric = _K.Mean()
    metric.update_state(predictions)
    return float(metric.result())


def _keras(constructor: Callable[[], tf.keras.metrics.Metric]) -> Callable[..., float]:
    def compute(labels: tf.Tensor, predictions: tf.Tensor) -> float:
        metric = constructor()
        metric.update_state(labels, predictions)
        return float(metric.result())

    return compute


# name -> (labels, predictions of the whole union) -> the value Keras computes.
KERAS_REFERENCE: dict[str, Callable[[tf.Tensor, tf.Tensor], float]] = {
    "auc-roc": _keras(_K.AUC),
    "auc-pr": _keras(lambda: _K.AUC(curve="PR")),
    "accuracy": _keras(_K.Accuracy),
    "binary_accuracy": _keras(_K.BinaryAccuracy),
    "binary_crossentropy": _keras(_K.BinaryCrossentropy),
    "binary_crossentropy_from_logits": _keras(lambda: _K.BinaryCrossentropy(from_logits=True)),
    "categorical_accuracy": _keras(_K.CategoricalAccuracy),
    "categorical_crossentropy": _keras(_K.CategoricalCrossentropy),
    "categorical_crossentropy_from_logits": _keras(
        lambda: _K.CategoricalCrossentropy(from_logits=True)
    ),
    "mean": _mean_of_predictions,
    "mean_absolute_error": _keras(_K.MeanAbsoluteError),
    "mean_absolute_percentage_error": _keras(_K.MeanAbsolutePercentageError),
    "mean_squared_error": _keras(_K.MeanSquaredError),
    "mean_squared_logarithmic_error": _keras(_K.MeanSquaredLogarithmicError),
    "precision": _keras(_K.Precision),
    "recall": _keras(_K.Recall),
    "root_mean_squared_error": _keras(_K.RootMeanSquaredError),
    "sparse_categorical_accuracy": _keras(_K.SparseCategoricalAccuracy),
    "sparse_categorical_crossentropy": _keras(_K.SparseCategoricalCrossentropy),
    "sparse_categorical_crossentropy_from_logits": _keras(
        lambda: _K.SparseCategoricalCrossentropy(from_logits=True)
    ),
}


def case_of(metric: str) -> ModelCase | None:
    """The model case that evaluates `metric`, None if no case does."""
    return next((c for c in CASES if metric in c.metrics), None)
