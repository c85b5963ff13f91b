"""Round lifecycle over HTTP: aggregation outputs, timeouts, deadlines, DP budget, failures."""

import json

import numpy as np
import pytest
from sqlalchemy import select

from fcp_server import checkpoints
from fcp_server.protos import task_builder_pb2, task_pb2
from fcp_server.services import blob_paths, round_close
from fcp_server.storage import transitions
from fcp_server.storage.models import (
    Assignment,
    AssignmentStatus,
    Round,
    RoundMetric,
    RoundStatus,
    StatusChange,
)
from tests.integration.server import testkit
from tests.integration.server.testkit import POP


def _rounds(ctx):
    with ctx.database.sessions() as session:
        return session.scalars(select(Round).order_by(Round.id)).all()


def test_two_full_rounds_publish_exact_fedavg_outputs_and_complete_the_task(
    api, ctx, blobs, worker
):
    api.open_training(testkit.training_task(report_goal=3, rounds=2))
    w0, b0 = testkit.initial_weights()
    deltas = [0.1, 0.2, 0.6]

    for d in deltas:
        api.contribute(testkit.update_bytes(d, 2 * d))
    assert worker.tick().rounds_closed == 1

    # No DP, SGD lr 1: w1 = w0 - mean(delta).
    plan = testkit.server_plan(report_goal=3)
    state = checkpoints.decode_server_checkpoint(
        blobs.get(blob_paths.server_checkpoint_blob(POP, 1, 1)), plan
    )
    np.testing.assert_allclose(state.weights.trainable[0], w0 - np.mean(deltas), rtol=1e-6)
    np.testing.assert_allclose(state.weights.trainable[1], b0 - 2 * np.mean(deltas), rtol=1e-6)
    assert state.round_num == 1
    client = checkpoints.decode_client_checkpoint(
        blobs.get(blob_paths.client_checkpoint_blob(POP, 1, 1)), plan
    )
    np.testing.assert_array_equal(client.trainable[0], state.weights.trainable[0])
    metrics = json.loads(blobs.get(blob_paths.metrics_blob(POP, 1, 1)))
    assert metrics["server/client_work/train/loss"] == pytest.approx(15.0 / 30.0)
    assert metrics["server/finalizer/update_non_finite"] == 0.0
    assert metrics["server/aggregator/num_clients"] == 3.0
    with ctx.database.sessions() as session:
        rows = dict(session.execute(select(RoundMetric.name, RoundMetric.value)).tuples().all())
    assert rows["server/client_work/train/loss"] == pytest.approx(0.5)

    # Round 2 starts from result 1.
    a = api.assign()
    assert a.proto.aggregation_id == "2"
    assert a.proto.init_checkpoint.uri.endswith("/aggregation/1/client_checkpoint")
    for _ in range(2):
        api.contribute()
    api.report(a)
    api.upload(f"{a.base}:upload", testkit.update_bytes())
    worker.tick()

    task = api.get_task(1)
    assert task.status == task_pb2.TaskStatus.COMPLETED
    assert task.completed_iterations == 2
    assert blobs.exists(blob_paths.server_checkpoint_blob(POP, 1, 2))
    assert [r.status for r in _rounds(ctx)] == [RoundStatus.COMPLETED] * 2
    assert all(r.aggregated_count == 3 for r in _rounds(ctx))


def test_only_one_worker_claims_a_round(api, ctx, worker):
    api.open_training(testkit.training_task(report_goal=1, rounds=1))
    api.contribute()
    pk = round_close.aggregating_rounds(worker._deps)[0]
    assert round_close.close_round(worker._deps, pk) is True
    assert round_close.close_round(worker._deps, pk) is False  # already claimed and done
    with ctx.database.sessions() as session:
        changes = session.scalars(
            select(StatusChange.to_status).where(
                StatusChange.entity == "ROUND", StatusChange.entity_id == str(pk)
            )
        ).all()
    assert changes == ["COLLECTING", "AGGREGATING", "APPLYING", "COMPLETED"]


def test_silent_devices_time_out_and_free_their_slots(api, ctx, clock, worker):
    api.open_training(testkit.training_task(report_goal=2, max_size=2))
    silent = api.assign()
    uploading = api.assign()
    api.report(uploading)
    assert api.checkin()[1].WhichOneof("result") == "rejection_info"  # full

    clock.advance(ctx.settings.local_compute_timeout_seconds + 1)
    assert worker.tick().expired_assignments == 2

    with ctx.database.sessions() as session:
        assert (
            session.get(Assignment, silent.proto.assignment_id).status
            == AssignmentStatus.LOCAL_TIMEOUT
        )
        assert (
            session.get(Assignment, uploading.proto.assignment_id).status
            == AssignmentStatus.UPLOAD_TIMEOUT
        )
    assert api.checkin()[0].status_code == 201
    # The late device's upload is refused cleanly.
    assert api.upload(f"{uploading.base}:upload", testkit.update_bytes()).status_code == 409


def test_round_deadline_retries_then_fails_the_task(api, ctx, clock, worker):
    plan = testkit.server_plan(report_goal=2, deadline_seconds=600)
    api.open_training(testkit.training_task(report_goal=2), plan=plan)
    api.contribute()  # 1 of 2: this attempt cannot make it

    for attempt in range(ctx.settings.max_round_attempts):
        clock.advance(601)
        assert worker.tick().expired_rounds == 1
        if attempt + 1 < ctx.settings.max_round_attempts:
            a = api.assign()  # the new attempt takes devices again
            assert a.proto.aggregation_id == "1"

    rounds = _rounds(ctx)
    assert [r.attempt for r in rounds] == [0, 1, 2]
    assert [r.status for r in rounds] == [
        RoundStatus.CANCELED,
        RoundStatus.CANCELED,
        RoundStatus.FAILED,
    ]
    task = api.get_task(1)
    assert task.status == task_pb2.TaskStatus.FAILED
    assert "deadline" in task.status_reason


def test_dp_budget_stops_the_task_before_overspending(api, ctx, blobs, worker):
    plan = testkit.server_plan(
        report_goal=2,
        dp_type=task_builder_pb2.DpAggregator.FIXED_GAUSSIAN,
        noise_multiplier=1.0,
        clip_norm=1.0,
        population_size=20,
        target_epsilon=1.8,
    )
    api.open_training(testkit.training_task(report_goal=2, rounds=3), plan=plan)

    api.contribute()
    api.contribute()
    worker.tick()

    task = api.get_task(1)
    metrics = json.loads(blobs.get(blob_paths.metrics_blob(POP, 1, 1)))
    assert metrics["server/dp/epsilon_spent"] == pytest.approx(task.epsilon_spent)
    assert task.epsilon_spent == pytest.approx(1.685, abs=0.01)  # round 2 would be 1.917
    assert metrics["server/dp/rounds_within_budget"] == 1.0
    assert metrics["server/dp/target_epsilon"] == 1.8
    assert metrics["server/aggregator/dp/noise_multiplier"] == 1.0
    assert metrics["server/aggregator/dp/noise_stddev"] == pytest.approx(0.5)
    assert task.status == task_pb2.TaskStatus.COMPLETED
    assert "DP budget" in task.status_reason
    assert task.completed_iterations == 1


def test_failed_aggregation_is_retried_then_fails_the_task(api, ctx, blobs, worker):
    api.open_training(testkit.training_task(report_goal=1, rounds=1))
    a = api.contribute()
    blobs.delete(blob_paths.gradient_blob(POP, 1, 1, a.proto.assignment_id))

    for _ in range(ctx.settings.max_apply_attempts):
        assert worker.tick().rounds_closed == 0

    (rnd,) = _rounds(ctx)
    assert rnd.status == RoundStatus.FAILED
    assert rnd.apply_attempts == ctx.settings.max_apply_attempts
    assert api.get_task(1).status == task_pb2.TaskStatus.FAILED


def test_abandoned_claim_is_recovered_after_the_lease(api, ctx, clock, worker):
    api.open_training(testkit.training_task(report_goal=1, rounds=1))
    api.contribute()
    with ctx.database.sessions() as session, session.begin():  # a worker claims, then dies
        rnd = session.scalar(select(Round))
        transitions.move_round(
            session,
            rnd.id,
            RoundStatus.AGGREGATING,
            RoundStatus.APPLYING,
            now=clock.now(),
            apply_attempts=1,
        )

    assert worker.tick().rounds_closed == 0
    clock.advance(ctx.settings.apply_lease_seconds + 1)
    report = worker.tick()

    assert report.recovered_applies == 1 and report.rounds_closed == 1
    assert api.get_task(1).status == task_pb2.TaskStatus.COMPLETED


def test_open_refuses_a_budget_too_small_for_one_round(api):
    plan = testkit.server_plan(
        report_goal=2,
        dp_type=task_builder_pb2.DpAggregator.FIXED_GAUSSIAN,
        noise_multiplier=1.0,
        clip_norm=1.0,
        population_size=20,
        target_epsilon=1.0,
    )
    created = api.created(testkit.training_task(report_goal=2)).task
    api.upload_artifacts(created, plan, testkit.client_plan(), testkit.initial_checkpoint())

    resp = api.task_call(POP, 1, "open")

    assert resp.status_code == 400
    assert "epsilon" in resp.get_json()["error"]["message"]
