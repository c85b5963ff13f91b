# Fixtures are imported from saved_examples, so pytest's argument injection reads as F811.
# ruff: noqa: F811
import uuid

import numpy as np
import pytest

pytest.importorskip("tensorflow_federated")

import tensorflow as tf

from fcp_server.storage import blobs
from task_builder import model_loading
from task_builder.errors import ModelLoadError
from task_builder.examples import models
from tests.unit.task_builder.saved_examples import dense_model, digits_model, saved_dir  # noqa: F401

pytestmark = pytest.mark.tf


def test_loaded_model_has_saved_weights_as_tuples(digits_model):
    original = models.build_functional(models.EXAMPLES["digits_cnn"])
    trainable, non_trainable = digits_model.initial_weights
    assert isinstance(trainable, tuple) and non_trainable == ()
    for a, b in zip(trainable, original.initial_weights[0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_loaded_model_predicts_like_the_keras_model(dense_model):
    keras_model = models.EXAMPLES["dense_dict"].keras_model(0)  # same seed, same weights
    x = {
        models.DENSE_FEATURES[0]: tf.linspace(-1.0, 1.0, 8)[None, :4] * tf.ones([2, 1]),
        models.DENSE_FEATURES[1]: tf.ones([2, 3]),
    }
    got = dense_model.predict_on_batch(dense_model.initial_weights, x, False)
    np.testing.assert_allclose(got, keras_model(x, training=False), rtol=1e-6)


def test_missing_directory_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="No SavedModel"):
        model_loading.load_model(str(tmp_path / "nothing"))


def test_empty_uri_is_rejected():
    with pytest.raises(ModelLoadError, match="required"):
        model_loading.load_model("")


def test_plain_saved_model_is_not_a_functional_model(tmp_path):
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path / "plain"))
    with pytest.raises(ModelLoadError, match="FunctionalModel"):
        model_loading.load_model(str(tmp_path / "plain"))


def test_gcs_uri_without_bucket_is_rejected():
    with pytest.raises(ModelLoadError, match="no bucket"):
        model_loading.load_model("gs:///model")


@pytest.mark.gcs
def test_model_saved_in_gcs_loads_like_the_local_copy(saved_dir, gcs_emulator, monkeypatch):
    # Upload the real saved model directory to the GCS emulator, then load it by gs:// URI.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
    uri = f"gs://{gcs_emulator.bucket}/m-{uuid.uuid4().hex}/digits"
    store = blobs.make_blob_store(uri)
    local = saved_dir / "digits_cnn"
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.put(path.relative_to(local).as_posix(), path.read_bytes())
    store.close()
    loaded = model_loading.load_model(uri)
    expected = model_loading.load_model(str(local))
    for a, b in zip(loaded.initial_weights[0], expected.initial_weights[0], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gcs
def test_missing_gcs_model_is_a_model_load_error(gcs_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
    with pytest.raises(ModelLoadError, match="No saved model found"):
        model_loading.load_model(f"gs://{gcs_emulator.bucket}/m-{uuid.uuid4().hex}/none")
