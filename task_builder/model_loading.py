"""Loads the adopter's saved TFF FunctionalModel (local directory or gs:// URI).

ODP's task builder loads the SavedModel with `tff.learning.models.load_functional_model`
(TFF 0.87 `_LoadedFunctionalModel`). The loaded model is re-wrapped as a plain
`tff.learning.models.FunctionalModel` with tuple weights: the loaded predict function wants the
weights in the exact nesting they were saved with (tuples or lists), the rest of the builder and
TFF pass tuples, and the loaded object has no metric functions until `metric_specs` adds them.
"""

import logging
import os
import pathlib
import tempfile
from typing import Any

import tensorflow as tf
import tensorflow_federated as tff

from task_builder.errors import ModelLoadError

_LOG = logging.getLogger(__name__)
_GCS_PREFIX = "gs://"
# A SavedModel directory is small (graph + variables); refuse anything absurd.
_MAX_DOWNLOAD_BYTES = 2 * 1024**3
_MAX_DOWNLOAD_FILES = 10_000


def download_gcs_dir(uri: str, dest: pathlib.Path) -> int:
    """Copies every object under a gs:// prefix into dest; returns the number of files.

    Reads through the project's blob store, so the same code serves real GCS and the
    emulator (STORAGE_EMULATOR_HOST).

    Raises:
        ModelLoadError: Nothing is stored under the prefix, or it is too large.
    """
    from fcp_server.storage import blobs

    if not uri[len(_GCS_PREFIX) :].partition("/")[0]:
        raise ModelLoadError(f"Invalid saved model URI {uri!r}: no bucket")
    try:
        store = blobs.make_blob_store(uri.rstrip("/"))
    except blobs.BlobStoreError as e:
        raise ModelLoadError(f"Invalid saved model URI {uri!r}: {e}") from e
    count, total = 0, 0
    try:
        for name in store.list(""):
            target = (dest / name).resolve()
            if dest.resolve() not in target.parents:
                raise ModelLoadError(f"object {name!r} escapes the model directory")
            count += 1
            if count > _MAX_DOWNLOAD_FILES:
                raise ModelLoadError(f"saved model under {uri} is too large to load")
            data = store.get(name, max_bytes=_MAX_DOWNLOAD_BYTES - total)
            total += len(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    except blobs.BlobTooLarge as e:
        raise ModelLoadError(f"saved model under {uri} is too large to load") from e
    except blobs.BlobStoreError as e:
        raise ModelLoadError(f"Cannot read the saved model under {uri}: {e}") from e
    finally:
        store.close()
    if count == 0:
        raise ModelLoadError(f"No saved model found under {uri}")
    return count


def _normalize(loaded: Any) -> tff.learning.models.FunctionalModel:
    """Re-wraps a loaded model with tuple weights and no metrics."""
    trainable, non_trainable = loaded.initial_weights
    saved_structure = loaded.initial_weights

    def predict_on_batch(model_weights: Any, x: Any, training: bool) -> Any:
        # The saved concrete function was traced with the saved nesting (list or tuple).
        weights = tf.nest.pack_sequence_as(saved_structure, tf.nest.flatten(model_weights))
        return loaded.predict_on_batch(weights, x, training)

    def loss(output: Any, label: Any, sample_weight: Any = None) -> Any:
        return loaded.loss(output, label, sample_weight)

    return tff.learning.models.FunctionalModel(
        initial_weights=(tuple(trainable), tuple(non_trainable)),
        predict_on_batch_fn=tf.function(predict_on_batch),
        loss_fn=loss,
        input_spec=loaded.input_spec,
    )


def load_local(path: str) -> tff.learning.models.FunctionalModel:
    """Loads a FunctionalModel from a local SavedModel directory.

    Raises:
        ModelLoadError: The directory is missing or is not a saved FunctionalModel.
    """
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise ModelLoadError(f"No SavedModel (saved_model.pb) found at {path!r}")
    try:
        loaded = tff.learning.models.load_functional_model(path)
        return _normalize(loaded)
    except (ValueError, TypeError, AttributeError, OSError, tf.errors.OpError) as e:
        raise ModelLoadError(f"Cannot load a TFF FunctionalModel from {path!r}: {e}") from e


def load_model(uri: str) -> tff.learning.models.FunctionalModel:
    """Loads the saved FunctionalModel at a local path or a gs:// URI.

    Args:
        uri: A SavedModel directory written by `tff.learning.models.save_functional_model`.

    Returns:
        The model with tuple weights and no metrics installed.

    Raises:
        ModelLoadError: The URI is empty, unreachable or not a saved FunctionalModel.
    """
    if not uri or not isinstance(uri, str):
        raise ModelLoadError("`saved_model` URI is required but not set.")
    if not uri.startswith(_GCS_PREFIX):
        return load_local(uri)
    with tempfile.TemporaryDirectory(prefix="fcp-model-") as tmp:
        count = download_gcs_dir(uri, pathlib.Path(tmp))
        _LOG.info("downloaded %d files of %s", count, uri)
        # Loading reads the variables into memory, so the directory may go afterwards.
        return load_local(tmp)
