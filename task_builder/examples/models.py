"""Example Keras models turned into TFF FunctionalModels, as ODP adopters would build them.

* `digits_cnn`: a tiny CNN for scikit-learn's 8x8 digits (10 classes), fast to train in TFLite.
* `dense_dict`: a dense binary classifier over an OrderedDict of two named features, with a
  label_name (the ODP guide's dict-input form).
* `emnist_cnn`: the CNN of McMahan et al. 2017 (FedAvg, arXiv 1602.05629) on 28x28x1 inputs,
  10 classes, 1,663,370 parameters, the model the ODP guide trains; for benchmarks.

`functional_model_from_keras` needs a model factory, a loss and the batched `(x, y)` spec.
"""

import collections
import dataclasses
from collections.abc import Callable

import tensorflow as tf
import tensorflow_federated as tff

DENSE_FEATURES = ("age_bucket", "activity")
DENSE_LABEL = "clicked"


@dataclasses.dataclass(frozen=True)
class ExampleModel:
    """A named example: how to build its Keras model, loss and input spec."""

    name: str
    keras_model: Callable[[int], tf.keras.Model]  # seed -> model
    loss: Callable[[], tf.keras.losses.Loss]
    input_spec: tuple[object, tf.TensorSpec]


def _init(seed: int) -> tf.keras.initializers.Initializer:
    # An explicit seed per layer: reproducible weights, and Keras never falls back to
    # `random.randint(1, 1e9)` (a float bound, deprecated since Python 3.10).
    return tf.keras.initializers.GlorotUniform(seed=seed)


def _digits_cnn(seed: int) -> tf.keras.Model:
    inputs = tf.keras.Input(shape=(8, 8, 1), name="pixels")
    h = tf.keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer=_init(seed))(inputs)
    h = tf.keras.layers.Flatten()(h)
    outputs = tf.keras.layers.Dense(10, kernel_initializer=_init(seed + 1))(h)
    return tf.keras.Model(inputs, outputs)


def _dense_dict(seed: int) -> tf.keras.Model:
    age = tf.keras.Input(shape=(4,), name=DENSE_FEATURES[0])
    activity = tf.keras.Input(shape=(3,), name=DENSE_FEATURES[1])
    h = tf.keras.layers.Concatenate()([age, activity])
    h = tf.keras.layers.Dense(8, activation="relu", kernel_initializer=_init(seed))(h)
    outputs = tf.keras.layers.Dense(1, activation="sigmoid", kernel_initializer=_init(seed + 1))(h)
    return tf.keras.Model({DENSE_FEATURES[0]: age, DENSE_FEATURES[1]: activity}, outputs)


def _emnist_cnn(seed: int) -> tf.keras.Model:
    layers = tf.keras.layers
    return tf.keras.Sequential(
        [
            tf.keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, 5, padding="same", activation="relu", kernel_initializer=_init(seed)),
            layers.MaxPool2D(2, padding="same"),
            layers.Conv2D(
                64, 5, padding="same", activation="relu", kernel_initializer=_init(seed + 1)
            ),
            layers.MaxPool2D(2, padding="same"),
            layers.Flatten(),
            layers.Dense(512, activation="relu", kernel_initializer=_init(seed + 2)),
            layers.Dense(10, kernel_initializer=_init(seed + 3)),
        ]
    )


EXAMPLES: dict[str, ExampleModel] = {
    "digits_cnn": ExampleModel(
        "digits_cnn",
        _digits_cnn,
        lambda: tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        (tf.TensorSpec([None, 8, 8, 1], tf.float32), tf.TensorSpec([None], tf.int64)),
    ),
    "dense_dict": ExampleModel(
        "dense_dict",
        _dense_dict,
        tf.keras.losses.BinaryCrossentropy,
        (
            collections.OrderedDict(
                [
                    (DENSE_FEATURES[0], tf.TensorSpec([None, 4], tf.float32)),
                    (DENSE_FEATURES[1], tf.TensorSpec([None, 3], tf.float32)),
                ]
            ),
            tf.TensorSpec([None, 1], tf.float32),
        ),
    ),
    "emnist_cnn": ExampleModel(
        "emnist_cnn",
        _emnist_cnn,
        lambda: tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        (tf.TensorSpec([None, 28, 28, 1], tf.float32), tf.TensorSpec([None], tf.int64)),
    ),
}


def build_functional(example: ExampleModel, seed: int = 0) -> tff.learning.models.FunctionalModel:
    """The example as a FunctionalModel (weights initialised with a fixed seed)."""

    def keras_model() -> tf.keras.Model:
        return example.keras_model(seed)

    return tff.learning.models.functional_model_from_keras(
        keras_model, loss_fn=example.loss(), input_spec=example.input_spec
    )
