"""Model inputs -> DataSpec: how devices parse tf.train.Examples and batch them.

Follows ODP's `dataset_utils`: the model's `input_spec` is `(x, y)`; a single-tensor `x` is read
from Example key "x" with the label under "y", a dict `x` reads one key per feature and the
label under the config's `label_name`. int32 inputs are parsed as int64 and cast (tf.Example
has no int32). Batching is TFF's `dataset.batch(batch_size).take(max_batches)`, per epoch.
`client_dataset` builds that same pipeline in TF, for the reference TFF process.
"""

import collections
import dataclasses
import re
from typing import Any

import tensorflow as tf

from fcp_server.protos import plan_pb2
from task_builder.errors import ModelLoadError

SINGLE_FEATURE_KEY = "x"
SINGLE_LABEL_KEY = "y"
LABEL_INPUT = "y"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Model dtype -> dtype parsed from tf.train.Example.
_PARSED = {
    tf.float32: tf.float32,
    tf.float64: tf.float32,
    tf.int32: tf.int64,
    tf.int64: tf.int64,
    tf.string: tf.string,
}
_MAX_FEATURES = 64


@dataclasses.dataclass(frozen=True)
class InputTensor:
    """One model input read from an Example: its key, per-example shape and dtypes."""

    key: str  # tf.train.Example feature key
    input_name: str  # TFLite signature input
    shape: tuple[int, ...]  # without the batch dimension
    model_dtype: tf.DType
    parsed_dtype: tf.DType


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """The model's features and label as the plan reads them."""

    features: tuple[InputTensor, ...]
    label: InputTensor
    dict_features: bool


def _input_tensor(key: str, input_name: str, spec: Any, what: str) -> InputTensor:
    if not isinstance(spec, tf.TensorSpec):
        raise ModelLoadError(f"{what} must be a tf.TensorSpec, got {type(spec).__name__}")
    shape = spec.shape
    if shape.rank is None or shape.rank < 1:
        raise ModelLoadError(f"{what} needs a batch dimension, got shape {shape}")
    per_example = shape.as_list()[1:]
    if any(d is None for d in per_example):
        raise ModelLoadError(f"{what} must have a fully defined per-example shape, got {shape}")
    if spec.dtype not in _PARSED:
        raise ModelLoadError(f"{what} has unsupported dtype {spec.dtype.name}")
    return InputTensor(key, input_name, tuple(per_example), spec.dtype, _PARSED[spec.dtype])


def describe_inputs(input_spec: Any, label_name: str) -> ModelInputs:
    """Reads the model's `(x, y)` input_spec.

    Args:
        input_spec: The FunctionalModel's input_spec.
        label_name: The config's label name (required for dict features).

    Returns:
        The features and label, with Example keys and signature input names.

    Raises:
        ModelLoadError: The spec is not `(TensorSpec | Mapping[str, TensorSpec], TensorSpec)`.
    """
    if not isinstance(input_spec, tuple | list) or len(input_spec) != 2:
        raise ModelLoadError("the model's input_spec must be a 2-tuple (x, y)")
    x_spec, y_spec = input_spec
    if isinstance(x_spec, collections.abc.Mapping):
        if not label_name:
            raise ModelLoadError("Label name cannot be empty.")
        if not 0 < len(x_spec) <= _MAX_FEATURES:
            raise ModelLoadError(f"the model needs 1..{_MAX_FEATURES} features, has {len(x_spec)}")
        features = []
        for key, spec in x_spec.items():
            if not isinstance(key, str) or not _NAME_RE.match(key):
                raise ModelLoadError(f"feature name {key!r} must match {_NAME_RE.pattern}")
            if key == label_name:
                raise ModelLoadError(f"feature {key!r} has the label's name")
            features.append(_input_tensor(key, f"x_{key}", spec, f"feature {key!r}"))
        label = _input_tensor(label_name, LABEL_INPUT, y_spec, "the label")
        return ModelInputs(tuple(features), label, dict_features=True)
    feature = _input_tensor(SINGLE_FEATURE_KEY, SINGLE_FEATURE_KEY, x_spec, "the model input x")
    label = _input_tensor(SINGLE_LABEL_KEY, LABEL_INPUT, y_spec, "the label")
    return ModelInputs((feature,), label, dict_features=False)


def _feature_spec(tensor: InputTensor) -> plan_pb2.FeatureSpec:
    spec = plan_pb2.FeatureSpec(
        name=tensor.key,
        dtype=tensor.parsed_dtype.name,
        shape=list(tensor.shape),
        input_name=tensor.input_name,
    )
    if tensor.model_dtype != tensor.parsed_dtype:
        spec.model_dtype = tensor.model_dtype.name
    return spec


def build_data_spec(
    inputs: ModelInputs,
    *,
    batch_size: int,
    max_batches: int,
    num_epochs: int,
    example_selector_uri: str,
) -> plan_pb2.DataSpec:
    """The plan's DataSpec.

    Raises:
        ValueError: A batching parameter is out of range.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches == 0 or max_batches < -1:
        raise ValueError(f"max_batches must be -1 (all) or >= 1, got {max_batches}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    return plan_pb2.DataSpec(
        features=[_feature_spec(f) for f in inputs.features],
        label=_feature_spec(inputs.label),
        dict_features=inputs.dict_features,
        batch_size=batch_size,
        max_batches=max_batches,
        num_epochs=num_epochs,
        example_selector_uri=example_selector_uri,
    )


def signature_input_specs(inputs: ModelInputs) -> list[tf.TensorSpec]:
    """Batch inputs of the device program: parsed dtypes, variable batch dimension."""
    return [
        tf.TensorSpec([None, *t.shape], t.parsed_dtype, name=t.input_name)
        for t in (*inputs.features, inputs.label)
    ]


def to_model_batch(inputs: ModelInputs, tensors: list[tf.Tensor]) -> tuple[Any, tf.Tensor]:
    """Parsed batch tensors (signature order) -> the model's `(x, y)`, cast to model dtypes."""
    cast = [
        t if spec.model_dtype == spec.parsed_dtype else tf.cast(t, spec.model_dtype)
        for spec, t in zip((*inputs.features, inputs.label), tensors, strict=True)
    ]
    *features, label = cast
    if inputs.dict_features:
        x: Any = collections.OrderedDict(
            (spec.key, t) for spec, t in zip(inputs.features, features, strict=True)
        )
        return x, label
    return features[0], label


def client_dataset(
    serialized: tf.data.Dataset, inputs: ModelInputs, spec: plan_pb2.DataSpec
) -> tf.data.Dataset:
    """The reference client pipeline: batch, parse, take max_batches, repeat num_epochs."""
    features = {
        t.key: tf.io.FixedLenFeature(list(t.shape), t.parsed_dtype)
        for t in (*inputs.features, inputs.label)
    }

    def parse(batch: tf.Tensor) -> tuple[Any, tf.Tensor]:
        parsed = tf.io.parse_example(batch, features)
        return to_model_batch(inputs, [parsed[t.key] for t in (*inputs.features, inputs.label)])

    dataset = serialized.batch(spec.batch_size).map(parse).take(spec.max_batches)
    return dataset.repeat(spec.num_epochs)
