# Fixtures are imported from saved_examples, so pytest's argument injection reads as F811.
# ruff: noqa: F811
import pytest

pytest.importorskip("tensorflow_federated")

import tensorflow as tf
import tensorflow_federated as tff

from task_builder import flex_ops, model_loading, plans
from task_builder.errors import ArtifactBuildError, FlexOpsError
from task_builder.examples import save_models
from tests.unit.task_builder.saved_examples import (  # noqa: F401
    digits_model,
    make_config,
    saved_dir,
)

pytestmark = pytest.mark.tf


def test_allowlist_keeps_lowest_version_and_skips_comments(tmp_path):
    path = tmp_path / "ops.csv"
    path.write_text("# header\n\n341912000,L2Loss\n341812000,L2Loss\n341812000,Relu6\n")
    assert flex_ops.load_allowlist(path) == {"L2Loss": "341812000", "Relu6": "341812000"}


@pytest.mark.parametrize("row", ["abc,Relu6", "341812000", "341812000,Bad Op", "1,2,3"])
def test_malformed_allowlist_row_is_rejected(tmp_path, row):
    path = tmp_path / "ops.csv"
    path.write_text(f"341812000,Relu6\n{row}\n")
    with pytest.raises(ArtifactBuildError, match="row 2"):
        flex_ops.load_allowlist(path)


def test_shipped_allowlist_has_reference_rows():
    allowlist = flex_ops.load_allowlist()
    assert allowlist["L2Loss"] == "341912000"
    assert allowlist["ParseExampleV2"] == "341812000"
    assert allowlist["Conv2DBackpropFilter"] == "342012000"


def test_version_is_numeric_max_of_used_ops(digits_model):
    built = plans.build_plans(
        digits_model,
        make_config(mode="TRAINING_ONLY"),
        skip_dp_aggregator=False,
        skip_flex_ops_check=True,
    )
    tflite = built.training.client_plan.tflite_model
    flex, other = flex_ops.list_custom_ops(tflite)
    assert other == [] and "ReluGrad" in flex and "ReluGrad" in flex["ReluGrad"]
    # A 10-digit version beats 9-digit ones numerically (a string compare would not).
    allowlist = dict.fromkeys(flex, "341812000")
    allowlist["ReluGrad"] = "1000000000"
    report = flex_ops.check_flex_ops(tflite, allowlist)
    assert report.min_client_version == "1000000000"
    assert report.flex_ops == sorted(flex)


def test_not_a_tflite_model_is_an_artifact_error():
    with pytest.raises(ArtifactBuildError):
        flex_ops.list_custom_ops(b"\x00" * 3)


@pytest.fixture(scope="module")
def softsign_model(tmp_path_factory):
    # Softsign's gradient (SoftsignGrad) has no TFLite builtin: it becomes a Flex op that
    # the allowlist does not list.
    def keras_model():
        inputs = tf.keras.Input(shape=(3,))
        h = tf.keras.layers.Dense(
            2, activation="softsign", kernel_initializer=tf.keras.initializers.Ones()
        )(inputs)
        return tf.keras.Model(inputs, h)

    spec = (tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([None, 2], tf.float32))
    model = tff.learning.models.functional_model_from_keras(
        keras_model, tf.keras.losses.MeanSquaredError(), spec
    )
    path = tmp_path_factory.mktemp("softsign") / "model"
    save_models.save_functional_model(model, str(path))
    return model_loading.load_model(str(path))


def test_op_outside_allowlist_fails_naming_op_and_kernel(softsign_model):
    config = make_config(mode="TRAINING_ONLY")
    with pytest.raises(FlexOpsError) as err:
        plans.build_plans(
            softsign_model, config, skip_dp_aggregator=False, skip_flex_ops_check=False
        )
    assert "SoftsignGrad" in str(err.value) and "SoftsignGradOp" in str(err.value)
    assert err.value.http_status == 422


def test_skip_flex_ops_check_builds_anyway(softsign_model):
    config = make_config(mode="TRAINING_ONLY")
    built = plans.build_plans(
        softsign_model, config, skip_dp_aggregator=False, skip_flex_ops_check=True
    )
    assert built.training.min_client_version == "0"
    assert "SoftsignGrad" in built.training.flex_ops
