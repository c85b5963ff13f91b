"""The task-builder HTTP service through Flask's test client (and the real server app)."""

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from google.protobuf import json_format, text_format

from fcp_server.protos import common_pb2, plan_pb2, task_builder_pb2, task_pb2
from task_builder import service, service_cli
from tests.integration.task_builder.conftest import ADMIN_KEY, SERVER_URL, digits_config

pytestmark = pytest.mark.filterwarnings(
    # scipy 1.9 (pinned by TFF) calls a numpy 1.25-deprecated function inside dp_accounting.
    "ignore:np.find_common_type is deprecated:DeprecationWarning"
)

PROTO = "application/x-protobuf"
BUILD = "/taskbuilder/v1:build-task-group"
ARTIFACTS = "/taskbuilder/v1:build-artifacts"
ERR = task_builder_pb2.ErrorType
STATUS = task_pb2.TaskStatus
CONFIG = """
mode: TRAINING_ONLY population_name: "svc_pop"
policies { model_release_policy { num_max_training_rounds: 5 dp_target_epsilon: 10 } }
federated_learning { learning_process { runtime_config { report_goal: 10 } } }
differential_privacy { clip_norm: 1 noise_multiplier: 2 population_size: 1000 }
"""


def request_proto(
    config_text: str = CONFIG, uri: str = "", **flags: bool
) -> task_builder_pb2.BuildTaskRequest:
    return task_builder_pb2.BuildTaskRequest(
        saved_model=common_pb2.Resource(uri=uri),
        task_config=text_format.Parse(config_text, task_builder_pb2.TaskConfig()),
        flags=task_builder_pb2.ExperimentFlags(**flags),
    )


@pytest.fixture
def client():
    app = service.create_app(service.ServiceSettings(server_url="http://127.0.0.1:9"))
    return app.test_client()


def post_proto(client, path, body: bytes, content_type=PROTO):
    reply = client.post(path, data=body, content_type=content_type)
    return reply, task_builder_pb2.BuildTaskResponse.FromString(reply.data)


def test_ready_and_healthz(client):
    assert client.get("/ready").status_code == 200
    reply = client.get("/healthz")
    assert (reply.status_code, reply.data) == (200, b"ok\n")


def test_undecodable_binary_body_is_400_with_error_info(client):
    reply, response = post_proto(client, BUILD, b"\xff\xff\xff garbage")

    assert reply.status_code == 400
    assert reply.mimetype == PROTO
    assert response.error_info.error_type == ERR.INVALID_REQUEST
    assert "not a binary BuildTaskRequest" in response.error_info.error_message


def test_bad_json_body_is_400_with_json_error_info(client):
    reply = client.post(BUILD, data="{not json", content_type="application/json")

    assert reply.status_code == 400
    body = json.loads(reply.data)
    assert body["errorInfo"]["errorType"] == "INVALID_REQUEST"
    assert "not a JSON BuildTaskRequest" in body["errorInfo"]["errorMessage"]


def test_unsupported_media_type_is_415(client):
    reply, response = post_proto(client, BUILD, b"x", content_type="text/plain")

    assert reply.status_code == 415
    assert response.error_info.error_type == ERR.INVALID_REQUEST


def test_oversized_body_is_413(client):
    reply, response = post_proto(client, BUILD, b"\x00" * (4 * 1024 * 1024 + 1))

    assert reply.status_code == 413
    assert "larger than" in response.error_info.error_message


def test_invalid_config_is_400_with_the_validation_message(client):
    bad = CONFIG.replace('population_name: "svc_pop"', 'population_name: ""')

    reply, response = post_proto(client, BUILD, request_proto(bad).SerializeToString())

    assert reply.status_code == 400
    assert response.error_info.error_type == ERR.INVALID_REQUEST
    assert response.error_info.error_message == (
        "[Invalid task config]: key `population_name` has a bad value: `` in `task_config`. "
        "population_name is required and must be set to an non-empty string."
    )


def test_json_request_gets_a_json_reply(client):
    body = json_format.MessageToJson(request_proto(CONFIG.replace("report_goal: 10", "")))

    reply = client.post(BUILD, data=body, content_type="application/json")

    assert reply.status_code == 400
    assert reply.mimetype == "application/json"
    parsed = json_format.Parse(reply.data, task_builder_pb2.BuildTaskResponse())
    assert "key `report_goal` has a bad value: `0`" in parsed.error_info.error_message


def test_dp_over_budget_is_400_and_still_reports_the_epsilon(client):
    over = CONFIG.replace("dp_target_epsilon: 10", "dp_target_epsilon: 0.01")

    reply, response = post_proto(client, BUILD, request_proto(over).SerializeToString())

    assert reply.status_code == 400
    assert "not private enough to pass DP accounting check" in response.error_info.error_message
    dp = response.task_report.dp_hyperparameters
    assert dp.dp_epsilon > 0.01
    assert (dp.noise_multiplier, dp.accountant, dp.num_training_rounds) == (2.0, "PLD", 5)


def test_missing_saved_model_is_400_after_validation(client):
    reply, response = post_proto(client, BUILD, request_proto(uri="").SerializeToString())

    assert reply.status_code == 400
    assert response.error_info.error_message.startswith("saved_model.uri is required")
    assert response.task_report.applied_algorithms.dp_aggregator == "FIXED_GAUSSIAN"


def test_artifact_only_needs_artifact_urls(client):
    reply, response = post_proto(client, ARTIFACTS, request_proto(uri="/m").SerializeToString())

    assert reply.status_code == 400
    assert response.error_info.error_message == (
        "[Invalid task config]: key `plan_url` has a bad value: `` in "
        "`federated_learning.learning_process.artifact_building`. "
        "plan_url is required when building artifacts only."
    )


def test_unknown_route_is_404_with_error_info(client):
    reply, response = post_proto(client, "/taskbuilder/v1:nothing", b"")

    assert reply.status_code == 404
    assert response.error_info.error_type == ERR.INVALID_REQUEST


def test_settings_from_env():
    settings = service.ServiceSettings.from_env(
        {"FCP_SERVER_URL": "http://fcp:8080", "FCP_ADMIN_API_KEY": "k"}
    )

    assert (settings.server_url, settings.admin_api_key) == ("http://fcp:8080", "k")
    assert service.ServiceSettings.from_env({}).admin_api_key is None
    with pytest.raises(ValueError, match="FCP_SERVER_URL"):
        service.ServiceSettings(server_url="fcp:8080")


@pytest.mark.tf
@pytest.mark.slow
def test_build_task_group_registers_open_linked_tasks_on_the_server(
    digits_model_dir, server_transport, tm_client
):
    settings = service.ServiceSettings(server_url=SERVER_URL, admin_api_key=ADMIN_KEY)
    app = service.create_app(settings, server_transport=server_transport)
    build_request = task_builder_pb2.BuildTaskRequest(
        saved_model=common_pb2.Resource(uri=str(digits_model_dir)), task_config=digits_config()
    )

    reply, response = post_proto(app.test_client(), BUILD, build_request.SerializeToString())

    assert reply.status_code == 200, response.error_info.error_message
    group = response.task_group
    training = tm_client.get_task("digits_cnn", group.training_task.task_id)
    evaluation = tm_client.get_task("digits_cnn", group.eval_task.task_id)
    assert (training.status, evaluation.status) == (STATUS.OPEN, STATUS.OPEN)
    assert evaluation.info.evaluation_info.training_task_id == training.task_id
    assert training.min_client_version == group.training_task.min_client_version != "0"
    report = response.task_report
    assert [v.task for v in report.task_versions] == ["training", "evaluation"]
    assert report.dp_hyperparameters.noise_multiplier == pytest.approx(1.0)
    assert report.dp_hyperparameters.dp_epsilon < 10


@pytest.mark.tf
@pytest.mark.slow
def test_build_artifacts_writes_the_config_urls_and_registers_nothing(
    digits_model_dir, tmp_path, server_transport, tm_client
):
    config = digits_config()
    urls = {
        "plan": tmp_path / "out" / "plan.pb",
        "client": tmp_path / "out" / "client_only_plan.pb",
        "ckpt": tmp_path / "out" / "initial.safetensors",
        "eval_plan": tmp_path / "out" / "eval_plan.pb",
        "eval_client": tmp_path / "out" / "eval_client_only_plan.pb",
    }
    building = config.federated_learning.learning_process.artifact_building
    building.plan_url = str(urls["plan"])
    building.client_plan_url = urls["client"].as_uri()
    building.checkpoint_url = str(urls["ckpt"])
    eval_building = config.federated_learning.evaluation.artifact_building
    eval_building.plan_url = str(urls["eval_plan"])
    eval_building.client_plan_url = str(urls["eval_client"])
    settings = service.ServiceSettings(server_url=SERVER_URL, admin_api_key=ADMIN_KEY)
    app = service.create_app(settings, server_transport=server_transport)
    body = json_format.MessageToJson(
        task_builder_pb2.BuildTaskRequest(
            saved_model=common_pb2.Resource(uri=str(digits_model_dir)), task_config=config
        )
    )

    reply = app.test_client().post(ARTIFACTS, data=body, content_type="application/json")

    response = json_format.Parse(reply.data, task_builder_pb2.BuildTaskResponse())
    assert reply.status_code == 200, response.error_info.error_message
    server_plan = plan_pb2.ServerPlan.FromString(urls["plan"].read_bytes())
    client_plan = plan_pb2.ClientOnlyPlan.FromString(urls["client"].read_bytes())
    assert server_plan.kind == client_plan.kind == plan_pb2.PlanKind.TRAINING
    assert plan_pb2.ServerPlan.FromString(urls["eval_plan"].read_bytes()).kind == (
        plan_pb2.PlanKind.EVALUATION
    )
    assert urls["ckpt"].read_bytes() and urls["eval_client"].read_bytes()
    assert list(response.task_group.training_task.server_phase_url) == [str(urls["plan"])]
    assert tm_client.list_tasks("digits_cnn") == []


def test_service_cli_rejects_bad_options(capsys):
    assert service_cli.main(["--workers", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_service_cli_serves_under_gunicorn(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FCP_SERVER_URL": "http://127.0.0.1:9"}
    log = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "task_builder.service_cli", "--bind", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        reply = None
        for _ in range(300):
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert reply is not None and reply.status_code == 200, (
            tmp_path / "gunicorn.log"
        ).read_text()
        bad = httpx.post(
            f"http://127.0.0.1:{port}{BUILD}", content=b"\xff", headers={"content-type": PROTO}
        )
        assert bad.status_code == 400
        error = task_builder_pb2.BuildTaskResponse.FromString(bad.content).error_info
        assert error.error_type == ERR.INVALID_REQUEST
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
