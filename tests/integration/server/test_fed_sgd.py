"""FED_SGD end to end: devices upload mean gradients; the server applies DP mean + optimizer."""

import json

import numpy as np
import pytest

from fcp_server import checkpoints
from fcp_server.protos import task_builder_pb2, task_pb2
from fcp_server.services import blob_paths
from tests.integration.server import testkit
from tests.integration.server.testkit import POP

FED_SGD = task_builder_pb2.LearningAlgo.FED_SGD
FED_AVG = task_builder_pb2.LearningAlgo.FED_AVG


def _open_fed_sgd(api, plan):
    created = api.created(testkit.training_task(report_goal=2, rounds=2)).task
    api.upload_artifacts(
        created, plan, testkit.client_plan(algorithm=FED_SGD), testkit.initial_checkpoint()
    )
    resp = api.task_call(POP, created.task_id, "open")
    assert resp.status_code == 200, resp.get_data(as_text=True)


def test_fed_sgd_rounds_apply_the_mean_gradient_with_the_server_optimizer(api, blobs, worker):
    # Arrange: plan.proto's FED_SGD contract, server SGD with learning rate 0.5, no DP.
    plan = testkit.server_plan(report_goal=2, algorithm=FED_SGD, learning_rate=0.5)
    _open_fed_sgd(api, plan)
    w0, b0 = testkit.initial_weights()
    grads = [(1.0, -2.0), (3.0, 4.0)]  # each device's mean gradient over its examples

    # Act: two rounds, each from the previous result.
    for g_w, g_b in grads:
        api.contribute(testkit.update_bytes(g_w, g_b))
    assert worker.tick().rounds_closed == 1
    for g_w, g_b in grads:
        api.contribute(testkit.update_bytes(g_w, g_b))
    assert worker.tick().rounds_closed == 1

    # Assert: w_{t+1} = w_t - lr * mean(gradient), as TFF's build_fed_sgd.
    state = checkpoints.decode_server_checkpoint(
        blobs.get(blob_paths.server_checkpoint_blob(POP, 1, 2)), plan
    )
    np.testing.assert_allclose(state.weights.trainable[0], w0 - 2 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(state.weights.trainable[1], b0 - 2 * 0.5 * 1.0, rtol=1e-6)
    metrics = json.loads(blobs.get(blob_paths.metrics_blob(POP, 1, 2)))
    assert metrics["server/client_work/train/loss"] == pytest.approx(0.5)
    assert api.get_task(1).status == task_pb2.TaskStatus.COMPLETED


def test_fed_sgd_gradients_are_clipped_and_averaged_with_the_fixed_denominator(api, blobs, worker):
    # Arrange: a DP aggregator with clip 1 and (almost) no noise, so the clip is visible (the
    # tree type: its RDP accounting stays cheap at a tiny noise multiplier).
    plan = testkit.server_plan(
        report_goal=2,
        algorithm=FED_SGD,
        dp_type=task_builder_pb2.DpAggregator.TREE_AGGREGATION,
        noise_multiplier=1e-6,
        clip_norm=1.0,
    )
    _open_fed_sgd(api, plan)
    w0, b0 = testkit.initial_weights()

    # Act: one device's gradient has norm sqrt(3 + 4) > 1, the other is zero.
    api.contribute(testkit.update_bytes(1.0, 2.0))
    api.contribute(testkit.update_bytes(0.0, 0.0))
    worker.tick()

    # Assert: (g / |g| + 0) / 2 applied with learning rate 1.
    state = checkpoints.decode_server_checkpoint(
        blobs.get(blob_paths.server_checkpoint_blob(POP, 1, 1)), plan
    )
    scale = 1.0 / np.sqrt(7.0) / 2
    np.testing.assert_allclose(state.weights.trainable[0], w0 - scale, atol=1e-4)
    np.testing.assert_allclose(state.weights.trainable[1], b0 - 2 * scale, atol=1e-4)
    metrics = json.loads(blobs.get(blob_paths.metrics_blob(POP, 1, 1)))
    assert metrics["server/aggregator/clipped_count"] == 1.0
    assert metrics["server/dp/epsilon_spent"] > 0


def test_client_and_server_plans_must_agree_on_the_algorithm(api):
    created = api.created(testkit.training_task(report_goal=2)).task
    api.upload_artifacts(
        created,
        testkit.server_plan(report_goal=2, algorithm=FED_SGD),
        testkit.client_plan(algorithm=FED_AVG),
        testkit.initial_checkpoint(),
    )
    resp = api.task_call(POP, created.task_id, "open")
    assert resp.status_code == 400
    assert "algorithm" in resp.get_json()["error"]["message"]
    unknown = testkit.server_plan(report_goal=2, algorithm=7)
    assert api.put(created.server_phase_url[0], unknown.SerializeToString()).status_code == 400


def test_gaussian_plans_with_unaccountably_little_noise_are_refused(api):
    created = api.created(testkit.training_task(report_goal=2)).task
    plan = testkit.server_plan(
        report_goal=2,
        dp_type=task_builder_pb2.DpAggregator.FIXED_GAUSSIAN,
        noise_multiplier=1e-6,
        clip_norm=1.0,
    )
    resp = api.put(created.server_phase_url[0], plan.SerializeToString())
    assert resp.status_code == 400
    assert "noise_multiplier" in resp.get_json()["error"]["message"]
