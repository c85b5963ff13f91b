# Fixtures are imported from saved_examples, so pytest's argument injection reads as F811.
# ruff: noqa: F811
import collections

import numpy as np
import pytest

pytest.importorskip("tensorflow_federated")

import tensorflow as tf

from fcp_server import checkpoints
from fcp_server.aggregation.state import ModelWeights
from task_builder import export, flex_ops
from task_builder.errors import ArtifactBuildError
from task_builder.examples.models import DENSE_FEATURES
from task_builder.model_versions import ModelVersionError
from tests.unit.task_builder.saved_examples import (  # noqa: F401
    dense_model,
    digits_model,
    saved_dir,
)

pytestmark = pytest.mark.tf


def _perturbed(model, rng) -> ModelWeights:
    """Weights unlike the model's initial ones, as a trained round would hold."""
    trainable, non_trainable = model.initial_weights
    return ModelWeights(
        trainable=tuple(
            (np.asarray(w) + rng.normal(scale=0.5, size=np.shape(w))).astype(np.float32)
            for w in trainable
        ),
        non_trainable=tuple(np.asarray(w) for w in non_trainable),
    )


def _features(name, rng, n):
    if name == "digits":
        return rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    return {
        DENSE_FEATURES[0]: rng.normal(size=(n, 4)).astype(np.float32),
        DENSE_FEATURES[1]: rng.normal(size=(n, 3)).astype(np.float32),
    }


def _reference(model, weights, features):
    if isinstance(features, dict):
        x = collections.OrderedDict((k, tf.constant(features[k])) for k in DENSE_FEATURES)
    else:
        x = tf.constant(features)
    got = model.predict_on_batch((weights.trainable, weights.non_trainable), x, False)
    return np.asarray(got)


def _tflite_predict(path, features):
    interpreter = tf.lite.Interpreter(model_content=path.read_bytes())
    serve = interpreter.get_signature_runner(export.SERVE_SIGNATURE)
    feed = features if isinstance(features, dict) else {export.SINGLE_FEATURE_INPUT: features}
    return serve(**feed)[export.PREDICTIONS]


@pytest.mark.parametrize("name", ["digits", "dense"])
def test_exported_models_predict_with_the_checkpoint_weights(
    name, digits_model, dense_model, tmp_path
):
    model = digits_model if name == "digits" else dense_model
    rng = np.random.default_rng(11)
    weights = _perturbed(model, rng)
    checkpoint = checkpoints.encode_client_checkpoint(weights)

    exported = export.export_checkpoint(model, checkpoint, tmp_path / "out")

    features = _features(name, rng, 6)
    want = _reference(model, weights, features)
    initial = _reference(model, ModelWeights(*map(tuple, model.initial_weights)), features)
    assert not np.allclose(want, initial, rtol=1e-3)  # the weights really matter
    np.testing.assert_allclose(
        export.predict_saved_model(exported.saved_model_dir, features), want, rtol=1e-5
    )
    np.testing.assert_allclose(_tflite_predict(exported.tflite_path, features), want, rtol=1e-5)
    # Small dense/conv models need no Flex delegate on a serving device.
    assert not exported.tflite_select_tf_ops
    assert flex_ops.list_custom_ops(exported.tflite_path.read_bytes()) == ({}, [])


def test_saved_model_keeps_a_dict_signature_for_dict_models(dense_model, tmp_path):
    exported = export.export_model(
        dense_model, _perturbed(dense_model, np.random.default_rng(1)), tmp_path
    )
    loaded = tf.saved_model.load(str(exported.saved_model_dir))
    _, inputs = loaded.signatures[export.SERVE_SIGNATURE].structured_input_signature
    assert sorted(inputs) == sorted(DENSE_FEATURES)
    assert "serving_default" in loaded.signatures


def test_wrong_shape_checkpoint_names_the_tensor(digits_model, tmp_path):
    weights = _perturbed(digits_model, np.random.default_rng(2))
    bad = ModelWeights((weights.trainable[0][..., :4], *weights.trainable[1:]), ())
    with pytest.raises(ModelVersionError, match=r"'trainable/0' is float32\[3, 3, 1, 4\]"):
        export.export_checkpoint(
            digits_model, checkpoints.encode_client_checkpoint(bad), tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()


def test_export_refuses_to_overwrite_unless_asked(digits_model, tmp_path):
    first = _perturbed(digits_model, np.random.default_rng(3))
    export.export_model(digits_model, first, tmp_path)
    second = _perturbed(digits_model, np.random.default_rng(4))
    with pytest.raises(ArtifactBuildError, match="already exists"):
        export.export_model(digits_model, second, tmp_path)

    exported = export.export_model(digits_model, second, tmp_path, overwrite=True)

    features = _features("digits", np.random.default_rng(5), 3)
    np.testing.assert_allclose(
        export.predict_saved_model(exported.saved_model_dir, features),
        _reference(digits_model, second, features),
        rtol=1e-5,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite", "saved_model"]


def test_unwritable_output_is_an_artifact_error(digits_model, tmp_path):
    target = tmp_path / "a_file"
    target.write_bytes(b"")
    weights = _perturbed(digits_model, np.random.default_rng(6))
    with pytest.raises(ArtifactBuildError, match="Cannot write the export"):
        export.export_model(digits_model, weights, target)


def _hashing_model():
    """A string-feature model: hashing has no TFLite builtin, so it needs select TF ops."""
    import tensorflow_federated as tff

    def predict(weights, x, training=False):
        del training
        (kernel,), _ = weights
        buckets = tf.strings.to_hash_bucket_fast(x[:, 0], 4)
        return tf.matmul(tf.one_hot(buckets, 4), kernel)

    def loss(output, label, sample_weight=None):
        del sample_weight
        return tf.reduce_mean(tf.square(output - label))

    return tff.learning.models.FunctionalModel(
        initial_weights=((np.zeros((4, 1), np.float32),), ()),
        predict_on_batch_fn=tf.function(predict),
        loss_fn=loss,
        input_spec=(tf.TensorSpec([None, 1], tf.string), tf.TensorSpec([None, 1], tf.float32)),
    )


def test_ops_without_builtins_fall_back_to_select_tf_ops(tmp_path):
    model = _hashing_model()
    kernel = np.arange(4, dtype=np.float32).reshape(4, 1)
    exported = export.export_model(model, ModelWeights((kernel,), ()), tmp_path)

    assert exported.tflite_select_tf_ops
    flex, _ = flex_ops.list_custom_ops(exported.tflite_path.read_bytes())
    assert "StringToHashBucketFast" in flex
    words = np.array([[b"a"], [b"bb"], [b"ccc"]])
    want = _reference(model, ModelWeights((kernel,), ()), words)
    np.testing.assert_allclose(export.predict_saved_model(exported.saved_model_dir, words), want)
    # The Python interpreter links the Flex delegate, as a device with select TF ops would.
    np.testing.assert_allclose(_tflite_predict(exported.tflite_path, words), want)
