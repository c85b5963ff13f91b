# Fixtures are imported from saved_examples, so pytest's argument injection reads as F811.
# ruff: noqa: F811
import collections

import numpy as np
import pytest

pytest.importorskip("tensorflow_federated")

import safetensors.numpy
import tensorflow as tf

from fcp_server.protos import plan_pb2, task_builder_pb2
from task_builder import optimizer_math, plans
from task_builder.errors import TaskConfigError
from task_builder.examples.models import DENSE_FEATURES
from tests.unit.task_builder.program_runner import (
    batch_feed,
    metric_states,
    runner,
    weight_feed,
)
from tests.unit.task_builder.saved_examples import (  # noqa: F401
    dense_model,
    digits_model,
    make_config,
    saved_dir,
)

pytestmark = pytest.mark.tf


def _digits_batch(rng, n):
    x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    return {"x": x}, rng.integers(0, 10, n).astype(np.int64)


def _dense_batch(rng, n):
    features = {
        DENSE_FEATURES[0]: rng.normal(size=(n, 4)).astype(np.float32),
        DENSE_FEATURES[1]: rng.normal(size=(n, 3)).astype(np.float32),
    }
    return features, rng.integers(0, 2, (n, 1)).astype(np.float32)


def _model_x(features, dict_features):
    if dict_features:
        return collections.OrderedDict((k, tf.constant(features[k])) for k in DENSE_FEATURES)
    return tf.constant(features["x"])


def _tf_step(model, weights, x, y, optimizer, opt_state):
    """The reference step: TFF's optimizer on a GradientTape gradient, in eager TF."""
    trainable = tuple(tf.constant(w) for w in weights)
    with tf.GradientTape() as tape:
        tape.watch(trainable)
        output = model.predict_on_batch((trainable, ()), x, True)
        loss = model.loss(output=output, label=tf.constant(y))
    grads = tape.gradient(loss, trainable)
    opt_state, new = optimizer.next(opt_state, trainable, grads)
    return [w.numpy() for w in new], opt_state, float(loss)


@pytest.fixture(scope="module")
def digits_plans(digits_model):
    config = make_config(metrics=("sparse_categorical_accuracy", "not_a_metric"), batch_size=5)
    return plans.build_plans(
        digits_model, config, skip_dp_aggregator=False, skip_flex_ops_check=False
    )


def test_digits_task_plans_follow_the_contract(digits_plans, digits_model):
    train, ev = digits_plans.training, digits_plans.evaluation
    assert train is not None and ev is not None
    client, server = train.client_plan, train.server_plan
    assert client.kind == plan_pb2.PlanKind.TRAINING and client.train_signature == "train"
    assert [t.name for t in client.model.trainable] == [
        f"trainable/{i}" for i in range(len(digits_model.initial_weights[0]))
    ]
    assert [(f.name, f.dtype, list(f.shape)) for f in client.data_spec.features] == [
        ("x", "float32", [8, 8, 1])
    ]
    assert (client.data_spec.label.name, client.data_spec.label.dtype) == ("y", "int64")
    assert (client.data_spec.batch_size, client.data_spec.max_batches) == (5, -1)
    assert [m.name for m in client.metrics] == ["loss", "sparse_categorical_accuracy"]
    assert client.local_clip_norm == 1.0
    agg = server.aggregation
    assert agg.dp_type == task_builder_pb2.DpAggregator.FIXED_GAUSSIAN
    assert (agg.clients_per_round, agg.noise_multiplier, agg.clip_norm) == (20, 0.5, 1.0)
    assert (server.report_goal, server.num_rounds) == (20, 7)
    assert train.min_client_version == client.min_client_version == "342012000"
    assert "Conv2DBackpropFilter" in train.flex_ops
    # Eval: no optimizer, no checkpoint, its own report goal and data source, no DP.
    assert ev.initial_checkpoint is None and ev.client_plan.eval_signature == "evaluate"
    assert ev.server_plan.report_goal == 5 and ev.server_plan.aggregation.dp_type == 0
    assert ev.client_plan.data_spec.example_selector_uri == "app://eval"
    # The checkpoint is safetensors, readable without TF.
    tensors = safetensors.numpy.load(train.initial_checkpoint)
    assert sorted(tensors) == sorted(t.name for t in client.model.trainable)
    for i, w in enumerate(digits_model.initial_weights[0]):
        np.testing.assert_array_equal(tensors[f"trainable/{i}"], w)


def test_sgd_train_signature_matches_tf_step_on_full_and_partial_batches(
    digits_plans, digits_model
):
    plan = digits_plans.training.client_plan
    train = runner(plan, plan.train_signature)
    rng = np.random.default_rng(1)
    optimizer = optimizer_math.build_tff_optimizer(plan.client_optimizer)
    weights = list(digits_model.initial_weights[0])
    for n in (5, 3):  # the second batch is a partial one
        features, y = _digits_batch(rng, n)
        out = train(**weight_feed(weights), **batch_feed(plan, features, y))
        specs = tuple(tf.TensorSpec(w.shape, tf.float32) for w in weights)
        expected, _, loss = _tf_step(
            digits_model,
            weights,
            _model_x(features, False),
            y,
            optimizer,
            optimizer.initialize(specs),
        )
        for i, w in enumerate(expected):
            np.testing.assert_allclose(out[f"trainable_{i}"], w, atol=1e-5)
        assert int(out["num_examples"]) == n
        assert float(out["loss"]) == pytest.approx(loss, abs=1e-5)
        weights = [out[f"trainable_{i}"] for i in range(len(weights))]


def test_adam_dict_features_two_steps_match_tf(dense_model):
    config = make_config(
        mode="TRAINING_ONLY", label_name="clicked", client_opt="ADAM", client_lr=0.05
    )
    built = plans.build_plans(
        dense_model, config, skip_dp_aggregator=True, skip_flex_ops_check=False
    )
    assert built.evaluation is None
    plan = built.training.client_plan
    assert plan.data_spec.dict_features and plan.data_spec.label.name == "clicked"
    assert plan.client_optimizer_state[0].label == "step"
    train = runner(plan, plan.train_signature)
    optimizer = optimizer_math.build_tff_optimizer(plan.client_optimizer)
    weights = list(dense_model.initial_weights[0])
    state = optimizer.initialize(tuple(tf.TensorSpec(w.shape, tf.float32) for w in weights))
    opt_feed = {
        f"opt_{k}": np.zeros(tuple(s.shape), s.dtype)
        for k, s in enumerate(plan.client_optimizer_state)
    }
    rng = np.random.default_rng(2)
    for _ in range(2):
        features, y = _dense_batch(rng, 6)
        out = train(**weight_feed(weights), **opt_feed, **batch_feed(plan, features, y))
        expected, state, _ = _tf_step(
            dense_model, weights, _model_x(features, True), y, optimizer, state
        )
        for i, w in enumerate(expected):
            np.testing.assert_allclose(out[f"trainable_{i}"], w, atol=1e-5)
        weights = [out[f"trainable_{i}"] for i in range(len(weights))]
        opt_feed = {k: out[k] for k in opt_feed}
    assert int(opt_feed["opt_0"]) == 2
    assert built.training.server_plan.aggregation.dp_type == 0


def _finalize(spec, state):
    f = plan_pb2.MetricSpec.Finalizer
    if spec.finalizer == f.RATIO:
        return state[0] / state[1]
    if spec.finalizer == f.PRECISION:
        return state[0] / (state[0] + state[1])
    if spec.finalizer == f.RECALL:
        return state[0] / (state[0] + state[1])
    raise AssertionError(spec.finalizer)


def test_eval_metric_states_finalize_to_keras_values(dense_model):
    names = ("binary_accuracy", "auc-roc", "precision", "recall", "binary_crossentropy")
    config = make_config(mode="EVAL_ONLY", label_name="clicked", metrics=names)
    built = plans.build_plans(
        dense_model, config, skip_dp_aggregator=False, skip_flex_ops_check=False
    )
    assert built.training is None
    plan = built.evaluation.client_plan
    evaluate = runner(plan, plan.eval_signature)
    rng = np.random.default_rng(3)
    weights = dense_model.initial_weights[0]
    totals, preds, labels = None, [], []
    for n in (7, 4):
        features, y = _dense_batch(rng, n)
        out = evaluate(**weight_feed(weights), **batch_feed(plan, features, y))
        states = metric_states(plan, out)
        totals = (
            states
            if totals is None
            else {k: [a + b for a, b in zip(totals[k], v, strict=True)] for k, v in states.items()}
        )
        preds.append(
            dense_model.predict_on_batch(
                (tuple(weights), ()), _model_x(features, True), False
            ).numpy()
        )
        labels.append(y)
    y_all, p_all = np.concatenate(labels), np.concatenate(preds)
    keras = {
        "binary_accuracy": tf.keras.metrics.BinaryAccuracy(),
        "precision": tf.keras.metrics.Precision(),
        "recall": tf.keras.metrics.Recall(),
        "binary_crossentropy": tf.keras.metrics.BinaryCrossentropy(),
    }
    for name, metric in keras.items():
        metric.update_state(y_all, p_all)
        spec = next(s for s in plan.metrics if s.name == name)
        np.testing.assert_allclose(
            _finalize(spec, totals[name]).squeeze(), metric.result(), rtol=1e-5
        )
    # AUC: Keras finalizes our summed [tp, fp, tn, fn] state like its own.
    auc_from_state = tf.keras.metrics.AUC()
    tp, fp, tn, fn = totals["auc-roc"]
    for var, value in zip(auc_from_state.variables, (tp, tn, fp, fn), strict=True):
        var.assign(value)
    auc_direct = tf.keras.metrics.AUC()
    auc_direct.update_state(y_all, p_all)
    np.testing.assert_allclose(auc_from_state.result(), auc_direct.result(), rtol=1e-6)
    auc_spec = next(s for s in plan.metrics if s.name == "auc-roc")
    assert len(auc_spec.thresholds) == 200 and auc_spec.max_state_per_example == 1.0
    # The loss metric is the example-weighted mean loss.
    loss_state = totals["loss"]
    expected_loss = float(tf.keras.losses.BinaryCrossentropy()(y_all, p_all))
    assert loss_state[1] == 11 and loss_state[0] / loss_state[1] == pytest.approx(
        expected_loss, rel=1e-5
    )


def test_fed_sgd_gradient_signature_sums_the_batch_gradient(digits_model):
    config = make_config(mode="TRAINING_ONLY", algo="FED_SGD")
    built = plans.build_plans(
        digits_model, config, skip_dp_aggregator=False, skip_flex_ops_check=False
    )
    plan = built.training.client_plan
    assert plan.gradient_signature == "gradient" and not plan.train_signature
    assert not plan.client_optimizer_state
    rng = np.random.default_rng(4)
    features, y = _digits_batch(rng, 6)
    weights = digits_model.initial_weights[0]
    out = runner(plan, plan.gradient_signature)(
        **weight_feed(weights), **batch_feed(plan, features, y)
    )
    trainable = tuple(tf.constant(w) for w in weights)
    with tf.GradientTape() as tape:
        tape.watch(trainable)
        output = digits_model.predict_on_batch((trainable, ()), _model_x(features, False), True)
        loss = digits_model.loss(output=output, label=tf.constant(y))
    for i, g in enumerate(tape.gradient(loss, trainable)):
        np.testing.assert_allclose(out[f"grad_{i}"], 6 * g.numpy(), atol=1e-5)


def test_server_optimizer_state_is_zero_in_the_checkpoint(digits_model):
    config = make_config(mode="TRAINING_ONLY", server_opt="ADAM", server_lr=0.01)
    built = plans.build_plans(
        digits_model, config, skip_dp_aggregator=False, skip_flex_ops_check=True
    )
    server = built.training.server_plan
    labels = [s.name for s in server.server_optimizer_state]
    n = len(digits_model.initial_weights[0])
    assert labels[0] == "server_optimizer/step" and len(labels) == 1 + 2 * n
    tensors = safetensors.numpy.load(built.training.initial_checkpoint)
    assert tensors["server_optimizer/step"].dtype == np.int64
    assert all(not tensors[name].any() for name in labels)
    assert built.training.min_client_version == "0"  # check skipped
    assert built.training.flex_ops  # still listed


def test_bad_batching_is_a_config_error(digits_model):
    config = make_config(mode="TRAINING_ONLY", batch_size=0)
    with pytest.raises(TaskConfigError, match="batch_size"):
        plans.build_plans(digits_model, config, skip_dp_aggregator=False, skip_flex_ops_check=True)


@pytest.mark.parametrize(
    ("dp", "local_clip"),
    [
        ("FIXED_GAUSSIAN", 0.5),
        ("TREE_AGGREGATION", 0.0),
        ("ADAPTIVE_GAUSSIAN", 0.0),
        ("ADAPTIVE_TREE", 0.0),
    ],
)
def test_only_fixed_gaussian_devices_clip_their_own_update(dense_model, dp, local_clip):
    # The tree types zero an update above 100 x clip before clipping it (TFF zeroing_factory);
    # a device-side clip would hide such an update from the server's zeroing.
    config = make_config(mode="TRAINING_ONLY", label_name="clicked", dp=dp, clip=0.5)
    built = plans.build_plans(
        dense_model, config, skip_dp_aggregator=False, skip_flex_ops_check=True
    )
    assert built.training.client_plan.local_clip_norm == local_clip
