"""Task-management API: the contract the task builder relies on."""

import hashlib
import json

import numpy as np
from google.protobuf import json_format

from fcp_server import checkpoints
from fcp_server.protos import plan_pb2, task_pb2
from fcp_server.services import blob_paths
from tests.integration.server import testkit
from tests.integration.server.testkit import POP, Api


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _error(resp):
    body = resp.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == resp.status_code
    return body["error"]


def test_create_assigns_ids_status_and_artifact_urls(api):
    created = api.created(testkit.training_task()).task

    assert created.task_id == 1
    assert created.population_name == POP
    assert created.status == task_pb2.TaskStatus.CREATED
    base = f"/taskmanagement/v1/population/{POP}/tasks/1/artifacts"
    assert list(created.client_only_plan_url) == [f"{base}/client_only_plan"]
    assert list(created.server_phase_url) == [f"{base}/server_phase"]
    assert list(created.init_checkpoint_url) == [f"{base}/checkpoint"]
    assert len(created.metrics_url) == 1


def test_second_active_training_task_is_refused_then_allowed_after_cancel(api):
    api.created(testkit.training_task())

    resp = api.create(testkit.training_task())
    assert resp.status_code == 409
    assert _error(resp)["status"] == "ALREADY_EXISTS"

    assert api.task_call(POP, 1, "cancel").status_code == 200
    assert api.created(testkit.training_task()).task.task_id == 2


def test_eval_task_is_created_in_the_same_call_and_linked(api):
    response = api.created(testkit.training_task(), testkit.eval_task())

    assert response.task.task_id == 1
    assert response.eval_task.task_id == 2
    info = response.eval_task.info.evaluation_info
    assert info.training_task_id == 1
    assert info.training_population_name == POP
    assert list(response.eval_task.init_checkpoint_url) == []
    # One active eval task per population as well; an eval-only task names its training task.
    eval_only = testkit.eval_task()
    eval_only.info.evaluation_info.training_task_id = 1
    assert api.create(eval_only).status_code == 409
    api.task_call(POP, 2, "cancel")
    assert api.created(eval_only).task.info.evaluation_info.training_task_id == 1
    eval_only.info.evaluation_info.training_task_id = 99
    api.task_call(POP, 3, "cancel")
    assert api.create(eval_only).status_code == 400


def test_create_validates_fields(api):
    bad = [
        task_pb2.Task(total_iteration=0, min_aggregation_size=2),
        task_pb2.Task(total_iteration=1, min_aggregation_size=0),
        task_pb2.Task(total_iteration=1, min_aggregation_size=5, max_aggregation_size=3),
        task_pb2.Task(total_iteration=1, min_aggregation_size=1, min_client_version="abc"),
        task_pb2.Task(
            total_iteration=1,
            min_aggregation_size=1,
            min_client_version="9",
            max_client_version="1",
        ),
    ]
    for task in bad:
        resp = api.create(task)
        assert resp.status_code == 400, task
        assert _error(resp)["status"] == "INVALID_ARGUMENT"
    assert api.create(testkit.training_task(), pop="bad/pop").status_code in (400, 404)
    assert api.create(testkit.training_task(), pop="-x").status_code == 400


def test_json_bodies_and_json_answers(api):
    body = json_format.MessageToJson(task_pb2.CreateTaskRequest(task=testkit.training_task()))
    resp = api.client.post(
        f"/taskmanagement/v1/population/{POP}:create-task",
        data=body,
        headers={"Content-Type": "application/json"},
    )

    assert resp.status_code == 201
    assert resp.mimetype == "application/json"
    assert json.loads(resp.data)["task"]["taskId"] == "1"
    listed = api.client.get(
        f"/taskmanagement/v1/population/{POP}/tasks", headers={"Accept": "application/json"}
    )
    assert [t["taskId"] for t in listed.get_json()["tasks"]] == ["1"]


def test_malformed_bodies_are_400_and_unknown_content_type_415(api):
    url = f"/taskmanagement/v1/population/{POP}:create-task"
    assert (
        api.client.post(
            url, data=b"\xff\xff\xff", headers={"Content-Type": testkit.PROTO}
        ).status_code
        == 400
    )
    assert (
        api.client.post(url, data=b"{", headers={"Content-Type": "application/json"}).status_code
        == 400
    )
    resp = api.client.post(url, data=b"x", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415


def test_artifacts_are_validated_and_stored_at_reference_paths(api, blobs):
    task = api.created(testkit.training_task()).task

    assert api.put(task.server_phase_url[0], b"\x08\x63\xff").status_code == 400
    eval_plan = testkit.server_plan(kind=plan_pb2.PlanKind.EVALUATION)
    assert api.put(task.server_phase_url[0], eval_plan.SerializeToString()).status_code == 400
    assert api.put(task.init_checkpoint_url[0], b"garbage").status_code == 400
    api.upload_artifacts(
        task, testkit.server_plan(), testkit.client_plan(), testkit.initial_checkpoint()
    )

    # Stored by content while CREATED; published at the reference paths when the task opens.
    plan = testkit.server_plan().SerializeToString()
    uploaded = blob_paths.uploaded_artifact_blob(POP, 1, "server_phase", _sha(plan))
    assert blobs.get(uploaded) == plan
    for kind in ("client_only_plan", "server_phase", "checkpoint"):
        assert not blobs.exists(f"{POP}/1/0/s/0/{kind}")
    assert api.task_call(POP, 1, "open").status_code == 200
    for kind in ("client_only_plan", "server_phase", "checkpoint"):
        assert blobs.exists(f"{POP}/1/0/s/0/{kind}")
    stored = plan_pb2.ServerPlan.FromString(blobs.get(f"{POP}/1/0/s/0/server_phase"))
    assert stored == testkit.server_plan()


def test_checkpoint_not_matching_the_plan_is_refused(api):
    task = api.created(testkit.training_task()).task
    api.upload_artifacts(task, testkit.server_plan(), testkit.client_plan(), None)
    wrong = checkpoints.encode_tensors(
        {"trainable/0": np.zeros((4, 1), np.float32), "trainable/1": np.zeros((1,), np.float32)}
    )
    resp = api.put(task.init_checkpoint_url[0], wrong)
    assert resp.status_code == 400
    assert "trainable/0" in _error(resp)["message"]


def test_open_needs_every_artifact_then_starts_round_one(api, ctx, blobs):
    task = api.created(testkit.training_task()).task
    assert (
        api.put(task.server_phase_url[0], testkit.server_plan().SerializeToString()).status_code
        == 204
    )

    resp = api.task_call(POP, 1, "open")
    assert resp.status_code == 409
    assert "checkpoint" in _error(resp)["message"]

    api.upload_artifacts(
        task, testkit.server_plan(), testkit.client_plan(), testkit.initial_checkpoint()
    )
    opened = task_pb2.GetTaskByIdResponse.FromString(api.task_call(POP, 1, "open").data).task
    assert opened.status == task_pb2.TaskStatus.OPEN
    assert opened.current_iteration == 1
    assert blobs.exists(blob_paths.client_checkpoint_blob(POP, 1, 0))
    # Artifacts are frozen once the task left CREATED.
    assert (
        api.put(task.server_phase_url[0], testkit.server_plan().SerializeToString()).status_code
        == 409
    )
    assert api.task_call(POP, 1, "open").status_code == 409


def test_get_unknown_task_is_404_and_cancel_twice_is_409(api):
    assert api.task_call(POP, 7, "get").status_code == 404
    api.created(testkit.training_task())
    canceled = task_pb2.GetTaskByIdResponse.FromString(api.task_call(POP, 1, "cancel").data)
    assert canceled.task.status == task_pb2.TaskStatus.CANCELED
    assert api.task_call(POP, 1, "cancel").status_code == 409


def test_admin_key_is_required_when_configured(make_app):
    app = make_app(admin_api_key="s3cret")
    anonymous, with_header = Api(app.test_client()), Api(app.test_client(), {"x-api-key": "s3cret"})

    resp = anonymous.create(testkit.training_task())
    assert resp.status_code == 401
    assert _error(resp)["status"] == "UNAUTHENTICATED"
    assert (
        Api(app.test_client(), {"x-api-key": "wrong"}).create(testkit.training_task()).status_code
        == 401
    )
    assert with_header.create(testkit.training_task()).status_code == 201
    url = f"/taskmanagement/v1/population/{POP}/tasks/1:get?key=s3cret"
    assert anonymous.client.get(url).status_code == 200
