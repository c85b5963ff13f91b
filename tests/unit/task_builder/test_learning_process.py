# Fixtures are imported from saved_examples, so pytest's argument injection reads as F811.
# ruff: noqa: F811
import numpy as np
import pytest

pytest.importorskip("tensorflow_federated")

import tensorflow as tf

from fcp_server.protos import task_builder_pb2
from task_builder import data_spec, learning_process, plans
from task_builder.errors import TaskConfigError
from tests.unit.task_builder.program_runner import (
    batch_feed,
    metric_states,
    runner,
    weight_feed,
)
from tests.unit.task_builder.saved_examples import digits_model, make_config, saved_dir  # noqa: F401

pytestmark = pytest.mark.tf


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dp", "algo"),
    [
        ("FIXED_GAUSSIAN", "FED_AVG"),
        ("ADAPTIVE_GAUSSIAN", "FED_AVG"),
        ("TREE_AGGREGATION", "FED_AVG"),
        ("ADAPTIVE_TREE", "FED_AVG"),
        ("FIXED_GAUSSIAN", "FED_SGD"),
    ],
)
def test_compose_builds_every_dp_aggregator(digits_model, dp, algo):
    config = make_config(dp=dp, algo=algo, noise=0.5, report_goal=20, client_opt="ADAM")
    process = learning_process.compose(digits_model, config, skip_dp_aggregator=False)
    aggregator_state = process.initialize().aggregator
    assert aggregator_state is not None
    if dp.endswith("TREE"):
        assert learning_process.dp_settings(config).zeroing_norm == 100.0


def test_adaptive_clipping_needs_report_goal_above_ten_times_noise(digits_model):
    config = make_config(dp="ADAPTIVE_GAUSSIAN", noise=1.0, report_goal=10)
    with pytest.raises(TaskConfigError, match="10 x noise_multiplier"):
        learning_process.compose(digits_model, config, skip_dp_aggregator=False)


def _serialized(rng, n):
    records = []
    for _ in range(n):
        example = tf.train.Example()
        example.features.feature["x"].float_list.value.extend(rng.normal(size=64).tolist())
        example.features.feature["y"].int64_list.value.append(int(rng.integers(0, 10)))
        records.append(example.SerializeToString())
    return tf.data.Dataset.from_tensor_slices(records)


def test_one_round_of_plans_equals_the_tff_process(digits_model):
    # Arrange: FedAvg without DP, 2 clients, 3-example batches (last one partial).
    config = make_config(
        mode="TRAINING_ONLY",
        metrics=("sparse_categorical_accuracy",),
        batch_size=3,
        client_lr=0.1,
        server_lr=1.0,
    )
    built = plans.build_plans(
        digits_model, config, skip_dp_aggregator=True, skip_flex_ops_check=False
    )
    plan = built.training.client_plan
    inputs = data_spec.describe_inputs(digits_model.input_spec, "")
    rng = np.random.default_rng(5)
    datasets = [
        data_spec.client_dataset(_serialized(rng, n), inputs, plan.data_spec) for n in (7, 5)
    ]
    client_data = [list(ds) for ds in datasets]
    # Act (TFF reference).
    process = learning_process.compose(digits_model, config, skip_dp_aggregator=True)
    output = process.next(process.initialize(), datasets)
    tff_weights = process.get_model_weights(output.state).trainable
    tff_metrics = output.metrics["client_work"]["train"]
    # Act (devices running the TFLite program, server averaging uniformly).
    initial = [np.asarray(w) for w in digits_model.initial_weights[0]]
    train = runner(plan, plan.train_signature)
    updates, totals = [], None
    for batches in client_data:
        weights = list(initial)
        for x, y in batches:
            out = train(**weight_feed(weights), **batch_feed(plan, {"x": x.numpy()}, y.numpy()))
            weights = [out[f"trainable_{i}"] for i in range(len(weights))]
            states = metric_states(plan, out)
            totals = (
                states
                if totals is None
                else {
                    k: [a + b for a, b in zip(totals[k], v, strict=True)] for k, v in states.items()
                }
            )
        updates.append([a - b for a, b in zip(initial, weights, strict=True)])
    server_weights = [w - np.mean(u, axis=0) for w, *u in zip(initial, *updates, strict=True)]
    # Assert.
    for got, want in zip(server_weights, tff_weights, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert totals["loss"][1] == 12
    assert totals["loss"][0] / totals["loss"][1] == pytest.approx(tff_metrics["loss"], rel=1e-5)
    accuracy = totals["sparse_categorical_accuracy"]
    assert accuracy[0] / accuracy[1] == pytest.approx(
        tff_metrics["sparse_categorical_accuracy"], rel=1e-6
    )


def test_eval_process_builds(digits_model):
    config = make_config(mode="EVAL_ONLY", metrics=("sparse_categorical_accuracy",))
    process = learning_process.build_eval(digits_model, config)
    assert process.initialize() is not None
    assert config.mode == task_builder_pb2.TaskMode.EVAL_ONLY
