"""Fixtures for fleet tests: the digits task built by the task builder, and live servers.

The tasks are built from the example digits CNN and configs/digits_cnn_task.pbtxt (with a
small report goal and few rounds so the tests are quick) and registered over the task
management HTTP API, as the builder's registration step does.
"""

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time

import httpx
import pytest
from google.protobuf import text_format

from fcp_server.protos import common_pb2, task_builder_pb2, task_pb2

ROOT = pathlib.Path(__file__).resolve().parents[3]
PROTO = {"Content-Type": "application/x-protobuf", "Accept": "application/x-protobuf"}


def make_config(**overrides) -> task_builder_pb2.TaskConfig:
    """The example digits config, shrunk for tests (report goal, rounds, selector)."""
    config = text_format.Parse(
        (ROOT / "configs" / "digits_cnn_task.pbtxt").read_text(), task_builder_pb2.TaskConfig()
    )
    lp = config.federated_learning.learning_process
    lp.runtime_config.report_goal = overrides.get("report_goal", 4)
    lp.runtime_config.over_selection_rate = overrides.get("over_selection", 0.5)
    ev = config.federated_learning.evaluation
    ev.report_goal = overrides.get("eval_report_goal", 2)
    ev.checkpoint_selector = "every_1_round"
    config.policies.model_release_policy.num_max_training_rounds = overrides.get("rounds", 3)
    config.policies.data_availability_policy.min_example_count = overrides.get("min_examples", 1)
    config.population_name = overrides.get("population", "digits_cnn")
    return config


@pytest.fixture(scope="session")
def digits_plans(tmp_path_factory):
    """Training and eval plans of the digits task (TFLite programs, initial checkpoint)."""
    pytest.importorskip("tensorflow_federated")
    from task_builder import model_loading, plans
    from task_builder.examples import save_models

    model_dir = save_models.save_example("digits_cnn", tmp_path_factory.mktemp("models"))
    model = model_loading.load_model(str(model_dir))
    built = plans.build_plans(
        model, make_config(), skip_dp_aggregator=True, skip_flex_ops_check=False
    )
    assert built.training is not None and built.evaluation is not None
    return built


def _task(config, task_plans, *, eval_task: bool) -> task_pb2.Task:
    lp = config.federated_learning.learning_process
    ev = config.federated_learning.evaluation
    goal = ev.report_goal if eval_task else lp.runtime_config.report_goal
    rate = ev.over_selection_rate if eval_task else lp.runtime_config.over_selection_rate
    task = task_pb2.Task(
        total_iteration=config.policies.model_release_policy.num_max_training_rounds,
        min_aggregation_size=goal,
        max_aggregation_size=int(goal * (1 + rate)),
        min_client_version=task_plans.min_client_version or "0",
        max_client_version="999999999",
    )
    if eval_task:
        task.info.traffic_weight = 25
        task.info.evaluation_info.check_point_selector.iteration_selector.size = 1
    else:
        task.info.traffic_weight = 100
        policies = task.info.training_info.eligibility_task_info.eligibility_policies
        policies.add(min_sep_policy=config.policies.min_separation_policy)
        policies.add(data_availability_policy=config.policies.data_availability_policy)
    return task


def register_tasks(http: httpx.Client, config, built, *, with_eval: bool = True):
    """Creates the training (+ eval) tasks, uploads their artifacts and opens them."""
    pop = config.population_name
    req = task_pb2.CreateTaskRequest(task=_task(config, built.training, eval_task=False))
    if with_eval:
        req.eval_task.CopyFrom(_task(config, built.evaluation, eval_task=True))
    resp = http.post(
        f"/taskmanagement/v1/population/{pop}:create-task",
        content=req.SerializeToString(),
        headers=PROTO,
    )
    assert resp.status_code == 201, resp.text
    created = task_pb2.CreateTaskResponse.FromString(resp.content)
    uploads = [(created.task, built.training, True)]
    if with_eval:
        uploads.append((created.eval_task, built.evaluation, False))
    for task, task_plans, training in uploads:
        artifacts = [
            (task.client_only_plan_url[0], task_plans.client_plan.SerializeToString()),
            (task.server_phase_url[0], task_plans.server_plan.SerializeToString()),
        ]
        if training:
            artifacts.append((task.init_checkpoint_url[0], task_plans.initial_checkpoint))
        for url, data in artifacts:
            put = http.put(url, content=data, headers={"Content-Type": "application/octet-stream"})
            assert put.status_code == 204, put.text
    for task in [u[0] for u in uploads]:
        opened = http.post(
            f"/taskmanagement/v1/population/{pop}/tasks/{task.task_id}:open", headers=PROTO
        )
        assert opened.status_code == 200, opened.text
    return created.task, created.eval_task


def server_env(tmp_path, **overrides) -> dict[str, str]:
    """FCP_* variables of a demo server on SQLite + file:// blobs in tmp_path, fast timeouts."""
    values = {
        "FCP_DATABASE_URL": f"sqlite:///{tmp_path / 'fcp.db'}",
        "FCP_BLOB_URL": (tmp_path / "blobs").as_uri(),
        "FCP_WORKER_INTERVAL_SECONDS": "0.2",
        "FCP_LOCAL_COMPUTE_TIMEOUT_SECONDS": "3",
        "FCP_UPLOAD_TIMEOUT_SECONDS": "3",
        "FCP_ROUND_DEADLINE_SECONDS": "30",
        "FCP_LOG_FORMAT": "text",
        "FCP_LOG_LEVEL": "WARNING",
    }
    values.update({f"FCP_{k.upper()}": str(v) for k, v in overrides.items()})
    (tmp_path / "blobs").mkdir(exist_ok=True)
    return values


def server_settings(tmp_path, **overrides):
    """The same settings for an in-process server."""
    from fcp_server.settings import ServerSettings

    return ServerSettings.from_env(server_env(tmp_path, **overrides))


def free_port() -> int:
    """A currently free loopback TCP port."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live_server(tmp_path):
    """gunicorn serving create_app() on a free loopback port; stopped at teardown."""
    env = server_env(tmp_path)
    port = free_port()
    log = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--threads",
            "4",
            "fcp_server.app:create_app()",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def version_mix_latest():
    """Every device on a current runtime."""
    from client_sim.knobs import LATEST_VERSION_CODE, VersionMix

    return VersionMix(((LATEST_VERSION_CODE, 1.0),))


def rejection_name(value: int) -> str:
    """RejectionReason enum name (for messages)."""
    return common_pb2.RejectionReason.Enum.Name(value)
