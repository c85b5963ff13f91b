"""Exports one model version for serving: a SavedModel and a TFLite inference model.

After federated training the server holds each round's weights as a safetensors checkpoint
(plan.proto header; `model_versions`). Serving needs them inside the model: the adopter's saved
FunctionalModel (TFF `tff.learning.models.save_functional_model`) supplies the forward pass,
and a `tf.Module` holds the chosen round's weights as variables, with one signature
`serve(features) -> {"predictions": ...}` that runs `predict_on_batch(weights, features,
training=False)` (TFF's inference convention). The module is written with
`tf.saved_model.save`, then converted to TFLite with builtin ops only, falling back to select TF
ops (Flex) only when a builtin conversion is impossible (TF Lite guide, "Select TensorFlow
operators"); the converter folds the read-only variables into constants.
"""

import dataclasses
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.lite.python.convert_phase import ConverterError

from fcp_server.aggregation.state import ModelWeights
from fcp_server.protos import plan_pb2
from fcp_server.storage import blobs
from task_builder import model_versions, plans
from task_builder.errors import ArtifactBuildError, ModelLoadError

SERVE_SIGNATURE = "serve"
PREDICTIONS = "predictions"
SINGLE_FEATURE_INPUT = "features"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """Where an export was written, and whether its TFLite model needs the Flex delegate."""

    saved_model_dir: pathlib.Path
    tflite_path: pathlib.Path
    tflite_select_tf_ops: bool


def _input_signature(x_spec: Any) -> tf.TensorSpec | dict[str, tf.TensorSpec]:
    """The `features` spec of `serve`: the model's x spec with signature-friendly names."""
    if isinstance(x_spec, tf.TensorSpec):
        return tf.TensorSpec(x_spec.shape, x_spec.dtype, name=SINGLE_FEATURE_INPUT)
    if isinstance(x_spec, Mapping) and x_spec:
        specs = {}
        for key, spec in x_spec.items():
            if not isinstance(key, str) or not isinstance(spec, tf.TensorSpec):
                raise ModelLoadError(f"feature {key!r} is not a named tf.TensorSpec: {spec!r}")
            specs[key] = tf.TensorSpec(spec.shape, spec.dtype, name=key)
        return specs
    raise ModelLoadError(
        f"the model's features must be a tf.TensorSpec or a dict of them, got {x_spec!r}"
    )


def _output_dict(output: Any) -> dict[str, tf.Tensor]:
    flat = tf.nest.flatten(output)
    if len(flat) == 1:
        return {PREDICTIONS: flat[0]}
    return {f"{PREDICTIONS}_{i}": t for i, t in enumerate(flat)}


class _ServingModule(tf.Module):  # type: ignore[misc]  # TF ships no type stubs
    """The model's forward pass over the version's weights, held as variables."""

    def __init__(self, model: tff.learning.models.FunctionalModel, weights: ModelWeights) -> None:
        super().__init__(name="fcp_serving_model")
        # Lists, not tuples: tf.Module tracks lists as real list subclasses (see save_models).
        self.trainable_weights = [
            tf.Variable(w, trainable=False, name=f"trainable_{i}")
            for i, w in enumerate(weights.trainable)
        ]
        self.non_trainable_weights = [
            tf.Variable(w, trainable=False, name=f"non_trainable_{i}")
            for i, w in enumerate(weights.non_trainable)
        ]
        self._model = model
        self.serve = tf.function(
            self._serve, input_signature=[_input_signature(model.input_spec[0])]
        )

    def _serve(self, features: Any) -> dict[str, tf.Tensor]:
        # Read the variables first: the saved predict function takes weight tensors.
        weights = (
            tuple(v.read_value() for v in self.trainable_weights),
            tuple(v.read_value() for v in self.non_trainable_weights),
        )
        return _output_dict(self._model.predict_on_batch(weights, features, False))


def model_spec_of(model: tff.learning.models.FunctionalModel) -> plan_pb2.ModelSpec:
    """The ModelSpec (names, shapes, dtypes) a checkpoint of this model must match."""
    return plans.build_model_spec(model)


def save_serving_model(
    model: tff.learning.models.FunctionalModel, weights: ModelWeights, path: str | os.PathLike[str]
) -> None:
    """Writes a SavedModel whose `serve` signature predicts with `weights`.

    Args:
        model: The saved FunctionalModel, loaded (`model_loading.load_model`).
        weights: The version's weights; checked against the model's ModelSpec.
        path: The SavedModel directory to write.

    Raises:
        ModelVersionError: The weights do not fit the model (names the tensor).
        ArtifactBuildError: Tracing or saving failed.
    """
    checked = model_versions.check_weights(weights, model_spec_of(model))
    try:
        module = _ServingModule(model, checked)
        concrete = module.serve.get_concrete_function()
        signatures = {SERVE_SIGNATURE: concrete, "serving_default": concrete}
        tf.saved_model.save(module, os.fspath(path), signatures=signatures)
    except (ValueError, TypeError, OSError, tf.errors.OpError) as e:
        raise ArtifactBuildError(f"Cannot save the serving model: {e}") from e


def convert_to_tflite(saved_model_dir: str | os.PathLike[str]) -> tuple[bytes, bool]:
    """Converts the `serve` signature to TFLite: builtins only, else with select TF ops.

    Returns:
        The flatbuffer and whether it needs select TF ops (the Flex delegate).

    Raises:
        ArtifactBuildError: Neither conversion succeeds.
    """
    errors = []
    for select_ops in (False, True):
        converter = tf.lite.TFLiteConverter.from_saved_model(
            os.fspath(saved_model_dir), signature_keys=[SERVE_SIGNATURE]
        )
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.target_spec.supported_ops = (
            [*ops, tf.lite.OpsSet.SELECT_TF_OPS] if select_ops else ops
        )
        try:
            result: bytes = converter.convert()
            return result, select_ops
        except (ConverterError, ValueError) as e:
            errors.append(" ".join(str(e).split())[:500] or repr(e))
    raise ArtifactBuildError(f"Cannot convert the serving model to TFLite: {'; '.join(errors)}")


def _fresh_target(out_dir: pathlib.Path, overwrite: bool) -> None:
    for target in (out_dir / SAVED_MODEL_DIR, out_dir / TFLITE_FILE):
        if target.exists() and not overwrite:
            raise ArtifactBuildError(f"{target} already exists; pass overwrite to replace it")


def export_model(
    model: tff.learning.models.FunctionalModel,
    weights: ModelWeights,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> ExportedModel:
    """Writes out_dir/saved_model and out_dir/model.tflite for the given weights.

    Both are written to temporary names first and moved into place, so a failed export leaves
    no half-written model behind.

    Raises:
        ModelVersionError: The weights do not fit the model.
        ArtifactBuildError: Saving or conversion failed, or a target exists without overwrite.
    """
    out = pathlib.Path(out_dir)
    _fresh_target(out, overwrite)
    checked = model_versions.check_weights(weights, model_spec_of(model))  # before any write
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as tmp:
            staged = pathlib.Path(tmp) / SAVED_MODEL_DIR
            save_serving_model(model, checked, staged)
            tflite, select_ops = convert_to_tflite(staged)
            (pathlib.Path(tmp) / TFLITE_FILE).write_bytes(tflite)
            if (out / SAVED_MODEL_DIR).exists():
                shutil.rmtree(out / SAVED_MODEL_DIR)
            os.replace(staged, out / SAVED_MODEL_DIR)
            os.replace(pathlib.Path(tmp) / TFLITE_FILE, out / TFLITE_FILE)
    except OSError as e:
        raise ArtifactBuildError(f"Cannot write the export to {out}: {e}") from e
    return ExportedModel(out / SAVED_MODEL_DIR, out / TFLITE_FILE, select_ops)


def export_checkpoint(
    model: tff.learning.models.FunctionalModel,
    checkpoint: bytes,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> ExportedModel:
    """Exports the weights of a server, client or initial checkpoint (safetensors bytes).

    Raises:
        ModelVersionError: The checkpoint does not fit the model (names the tensor).
        ArtifactBuildError: Saving or conversion failed.
    """
    weights = model_versions.weights_from_checkpoint(checkpoint, model_spec_of(model))
    return export_model(model, weights, out_dir, overwrite=overwrite)


def export_version(
    model: tff.learning.models.FunctionalModel,
    store: blobs.BlobStore,
    population: str,
    task_id: int,
    out_dir: str | os.PathLike[str],
    *,
    round_num: int | None = None,
    overwrite: bool = False,
) -> tuple[model_versions.ModelVersion, ExportedModel]:
    """Exports one round of a task (default: the latest) from the server's blob store.

    Raises:
        ModelVersionError: No such round, or its checkpoint does not fit the model.
        ArtifactBuildError: Saving or conversion failed.
        BlobStoreError: The store failed.
    """
    version, weights = model_versions.load_version_weights(
        store, population, task_id, model_spec_of(model), round_num=round_num
    )
    return version, export_model(model, weights, out_dir, overwrite=overwrite)


def predict_saved_model(saved_model_dir: str | os.PathLike[str], features: Any) -> npt.NDArray[Any]:
    """Runs the exported `serve` signature on a batch; returns the predictions.

    A convenience for checks and demos: `features` is an array, or a dict of arrays for a
    dict-input model.
    """
    loaded = tf.saved_model.load(os.fspath(saved_model_dir))
    serve = loaded.signatures[SERVE_SIGNATURE]
    feed = features if isinstance(features, Mapping) else {SINGLE_FEATURE_INPUT: features}
    outputs = serve(**{k: tf.constant(v) for k, v in feed.items()})
    return np.asarray(outputs[PREDICTIONS])
