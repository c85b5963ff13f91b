"""Evaluation tasks over HTTP: checkpoint selectors, eval-only tasks, eval traffic share."""

import collections
import json

import pytest

from fcp_server.protos import plan_pb2, task_assignments_pb2, task_pb2
from fcp_server.services import blob_paths
from tests.integration.server import testkit
from tests.integration.server.testkit import POP

NOT_ELIGIBLE = task_assignments_pb2.ReportResultRequest.NOT_ELIGIBLE
EVAL_UPDATE = testkit.update_bytes(trainable=False, loss=(3.0, 4.0))


def _train_round(api, worker, step: float) -> None:
    api.contribute_to(1, testkit.update_bytes(step, step))
    assert worker.tick().rounds_closed == 1


def _eval_round(api, worker) -> None:
    api.contribute_to(2, EVAL_UPDATE)
    assert worker.tick().rounds_closed == 1


def _eval_metrics(blobs, iteration: int) -> dict[str, float]:
    return json.loads(blobs.get(blob_paths.metrics_blob(POP, 2, iteration)))


def _same_model(blobs, eval_iteration: int, training_round: int) -> bool:
    evaluated = blobs.get(blob_paths.client_checkpoint_blob(POP, 2, eval_iteration))
    return evaluated == blobs.get(blob_paths.client_checkpoint_blob(POP, 1, training_round))


def test_every_k_rounds_evaluates_the_newest_first_round_of_each_bucket(api, blobs, worker):
    # Arrange: TRAINING_AND_EVAL, 5 training rounds, evaluation every 2 rounds.
    api.open_training_and_eval(
        testkit.training_task(report_goal=1, rounds=5),
        testkit.eval_task(report_goal=1, rounds=10, every_rounds=2),
    )
    assert api.get_task(2).current_iteration == 0  # nothing to evaluate before round 1

    # Act + Assert: round 1 closes -> eval round 1 starts on result 1 at once.
    _train_round(api, worker, 0.1)
    assert api.get_task(2).current_iteration == 1
    a = api.assign()
    while a.proto.task_id != "2":  # the device checkpoint of an eval round is its own copy
        api.report(a, NOT_ELIGIBLE)
        a = api.assign()
    assert a.proto.init_checkpoint.uri.endswith("/task/2/aggregation/1/client_checkpoint")
    download = api.client.get(a.proto.init_checkpoint.uri)
    assert download.data == blobs.get(blob_paths.client_checkpoint_blob(POP, 1, 1))
    api.report(a, NOT_ELIGIBLE)
    _train_round(api, worker, 0.2)
    _train_round(api, worker, 0.3)
    _eval_round(api, worker)  # evaluates 1; candidates are now 1 and 3 -> 3 next
    _train_round(api, worker, 0.4)
    _train_round(api, worker, 0.5)
    assert api.get_task(1).status == task_pb2.TaskStatus.COMPLETED
    _eval_round(api, worker)  # evaluates 3; candidates 1, 3, 5 -> 5 next
    _eval_round(api, worker)  # evaluates 5; training ended, nothing newer

    evaluated = [_eval_metrics(blobs, n)["server/eval/training_round"] for n in (1, 2, 3)]
    assert evaluated == [1.0, 3.0, 5.0]
    assert all(_same_model(blobs, n, int(r)) for n, r in zip((1, 2, 3), evaluated, strict=True))
    assert not _same_model(blobs, 2, 2)  # different training rounds are different models
    first = _eval_metrics(blobs, 1)
    assert first["server/client_work/eval/loss"] == pytest.approx(0.75)
    assert first["server/client_work/eval/num_examples"] == 10.0
    assert first["server/aggregator/num_clients"] == 1.0
    done = api.get_task(2)
    assert done.status == task_pb2.TaskStatus.COMPLETED
    assert done.completed_iterations == 3
    assert "training task ended" in done.status_reason


def test_every_k_hours_evaluates_the_first_round_of_the_newest_window(api, blobs, clock, worker):
    # The manual clock starts on an hour boundary (2025-01-01 00:00 UTC).
    api.open_training_and_eval(
        testkit.training_task(report_goal=1, rounds=6),
        testkit.eval_task(report_goal=1, rounds=10, every_hours=1),
    )
    _train_round(api, worker, 0.1)  # 00:00, window 0: eval round 1 starts on result 1
    clock.advance(20 * 60)
    _train_round(api, worker, 0.2)  # 00:20, window 0
    clock.advance(50 * 60)
    _train_round(api, worker, 0.3)  # 01:10, window 1 (its first result)
    clock.advance(10 * 60)
    _train_round(api, worker, 0.4)  # 01:20, window 1
    _eval_round(api, worker)  # evaluates 1; newest window's first result is 3 (not 4, not 2)
    clock.advance(120 * 60)
    _train_round(api, worker, 0.5)  # 03:20, window 3
    clock.advance(10 * 60)
    _train_round(api, worker, 0.6)  # 03:30, window 3; training COMPLETED
    _eval_round(api, worker)  # evaluates 3; training COMPLETED, so its final result 6 is next
    _eval_round(api, worker)  # evaluates 6 (not 5: the released model is what matters)

    evaluated = [_eval_metrics(blobs, n)["server/eval/training_round"] for n in (1, 2, 3)]
    assert evaluated == [1.0, 3.0, 6.0]
    assert all(_same_model(blobs, n, int(r)) for n, r in zip((1, 2, 3), evaluated, strict=True))
    assert api.get_task(2).status == task_pb2.TaskStatus.COMPLETED


def test_the_final_training_result_is_evaluated_even_off_the_selector_grid(api, blobs, worker):
    # every_2_round over 4 rounds: the reference's candidates are 1 and 3 only.
    api.open_training_and_eval(
        testkit.training_task(report_goal=1, rounds=4),
        testkit.eval_task(report_goal=1, rounds=10, every_rounds=2),
    )
    for step in (0.1, 0.2, 0.3, 0.4):
        _train_round(api, worker, step)
    assert api.get_task(1).status == task_pb2.TaskStatus.COMPLETED
    _eval_round(api, worker)  # evaluates 1 (started when round 1 closed)
    _eval_round(api, worker)  # evaluates the final result 4, not the candidate 3

    evaluated = [_eval_metrics(blobs, n)["server/eval/training_round"] for n in (1, 2)]
    assert evaluated == [1.0, 4.0]
    assert _same_model(blobs, 2, 4)
    assert api.get_task(2).status == task_pb2.TaskStatus.COMPLETED


def test_eval_only_task_evaluates_an_existing_training_task(api, blobs, worker):
    # Arrange: a finished TRAINING_ONLY task.
    api.open_training(testkit.training_task(report_goal=1, rounds=2))
    _train_round(api, worker, 0.1)
    _train_round(api, worker, 0.2)
    assert api.get_task(1).status == task_pb2.TaskStatus.COMPLETED

    # Act: EVAL_ONLY names it by id.
    created = api.created(testkit.eval_task(report_goal=1, rounds=5, training_task_id=1)).task
    api.upload_eval_artifacts(created)
    opened = task_pb2.GetTaskByIdResponse.FromString(api.task_call(POP, 2, "open").data).task

    # Assert: it evaluates the newest result at once, then completes.
    assert opened.current_iteration == 1
    _eval_round(api, worker)
    assert _eval_metrics(blobs, 1)["server/eval/training_round"] == 2.0
    assert _same_model(blobs, 1, 2)
    assert api.get_task(2).status == task_pb2.TaskStatus.COMPLETED


def test_eval_tasks_are_validated(api):
    unknown = api.create(testkit.eval_task(training_task_id=7))
    assert unknown.status_code == 400
    assert "does not exist" in unknown.get_json()["error"]["message"]
    api.open_training(testkit.training_task(report_goal=1, rounds=1))
    negative = testkit.eval_task(training_task_id=1)
    negative.info.evaluation_info.check_point_selector.duration_selector.hours = -3
    resp = api.create(negative)
    assert resp.status_code == 400
    assert "duration_selector.hours" in resp.get_json()["error"]["message"]
    # An eval plan for another model cannot evaluate this training task's checkpoints.
    created = api.created(testkit.eval_task(report_goal=1, training_task_id=1)).task
    other = testkit.eval_plan(1)
    other.model.trainable[0].shape[:] = [4, 1]
    client = testkit.client_plan(plan_pb2.PlanKind.EVALUATION)
    client.model.CopyFrom(other.model)
    api.upload_artifacts(created, other, client, None)
    refused = api.task_call(POP, 2, "open")
    assert refused.status_code == 400
    assert "model differs" in refused.get_json()["error"]["message"]


@pytest.mark.slow
def test_evaluation_traffic_sets_the_share_of_check_ins_given_eval_work(api, worker):
    # Arrange: evaluation_traffic 0.2 -> weight 25 next to training's 100 (reference 1.11),
    # both rounds with room for every check-in below (no uploads, so they stay open).
    weight = testkit.reference_eval_weight(0.2)
    assert weight == 25
    api.open_training_and_eval(
        testkit.training_task(report_goal=1, rounds=3, max_size=2000),
        testkit.eval_task(report_goal=1, rounds=3, max_size=2000, weight=weight),
    )
    _train_round(api, worker, 0.1)  # gives eval round 1 something to evaluate

    # Act: many check-ins, drawn with the app's seeded generator.
    n = 1000
    counts = collections.Counter(api.assign().proto.task_id for _ in range(n))

    # Assert: P(eval) = 25 / 125 = 0.2 (binomial sd 0.013; 0.25 or 0.17 would fail).
    assert set(counts) == {"1", "2"}
    assert counts["2"] / n == pytest.approx(0.2, abs=0.025)


def test_an_eval_task_opens_only_after_its_training_task_so_its_model_is_final(api):
    # Arrange: a TRAINING_AND_EVAL pair, both built, neither opened.
    created = api.created(
        testkit.training_task(report_goal=1, rounds=2), testkit.eval_task(report_goal=1, rounds=2)
    )
    plan = testkit.server_plan(report_goal=1)
    api.upload_artifacts(created.task, plan, testkit.client_plan(), testkit.initial_checkpoint())
    api.upload_eval_artifacts(created.eval_task)

    # Act: open the eval task first.
    early = api.task_call(POP, 2, "open")

    # Assert: refused while the training task's model can still be replaced ...
    assert early.status_code == 409
    assert "still CREATED: open that task first" in early.get_json()["error"]["message"]
    assert api.get_task(2).status == task_pb2.TaskStatus.CREATED
    # ... as it can: a server plan for another model is accepted while the task is CREATED.
    other = testkit.server_plan(report_goal=1)
    other.model.trainable[0].shape[:] = [4, 1]
    assert api.put(created.task.server_phase_url[0], other.SerializeToString()).status_code == 204
    assert api.put(created.task.server_phase_url[0], plan.SerializeToString()).status_code == 204
    # Training first, then its eval task: both open.
    assert api.task_call(POP, 1, "open").status_code == 200
    assert api.task_call(POP, 2, "open").status_code == 200
    assert api.get_task(2).status == task_pb2.TaskStatus.OPEN
