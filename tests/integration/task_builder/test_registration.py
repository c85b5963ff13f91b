"""Registration against the real server app: one create request, uploads, open, rollback."""

import httpx
import pytest
from google.protobuf import text_format

from fcp_server.protos import task_builder_pb2, task_pb2
from task_builder import registration, task_config, tasks
from task_builder.errors import ArtifactBuildError, TaskConflictError, TaskManagementError
from tests.integration.task_builder.conftest import SERVER_URL, Plans

STATUS = task_pb2.TaskStatus
CONFIG = """
mode: TRAINING_AND_EVAL population_name: "reg_pop"
policies { model_release_policy { num_max_training_rounds: 2 } }
federated_learning {
  learning_process { runtime_config { report_goal: 3 } }
  evaluation { report_goal: 2 evaluation_traffic: 0.2 }
}
differential_privacy { clip_norm: 1 noise_multiplier: 1 }
"""


def task_protos(mode: str = "TRAINING_AND_EVAL", extra: str = "") -> tasks.TaskProtos:
    config = text_format.Parse(
        CONFIG.replace("TRAINING_AND_EVAL", mode), task_builder_pb2.TaskConfig()
    )
    text_format.Merge(extra, config)
    return tasks.build_tasks(task_config.validate_and_normalize(config))


def training_of(protos: tasks.TaskProtos) -> task_pb2.Task:
    assert protos.training is not None
    return protos.training


def eval_of(protos: tasks.TaskProtos) -> task_pb2.Task:
    assert protos.evaluation is not None
    return protos.evaluation


def test_training_and_eval_are_created_linked_uploaded_and_opened(
    tm_client, training_plans, eval_plans
):
    protos = task_protos()

    opened = registration.register_tasks(
        tm_client, "reg_pop", (training_of(protos), training_plans), (eval_of(protos), eval_plans)
    )

    training, evaluation = opened
    assert [t.status for t in opened] == [STATUS.OPEN, STATUS.OPEN]
    assert evaluation.info.evaluation_info.training_task_id == training.task_id
    assert evaluation.info.evaluation_info.training_population_name == "reg_pop"
    group = registration.task_group(opened)
    assert group.training_task.task_id == training.task_id
    assert group.eval_task.task_id == evaluation.task_id
    assert tm_client.get_task("reg_pop", training.task_id).status == STATUS.OPEN


def test_a_failed_upload_cancels_every_created_task(tm_client, training_plans, eval_plans):
    protos = task_protos()
    broken = Plans(**{**training_plans.__dict__, "initial_checkpoint": b"not safetensors"})

    with pytest.raises(ArtifactBuildError, match="Artifact failed to upload"):
        registration.register_tasks(
            tm_client, "reg_pop", (training_of(protos), broken), (eval_of(protos), eval_plans)
        )

    listed = tm_client.list_tasks("reg_pop")
    assert len(listed) == 2
    assert {t.status for t in listed} == {STATUS.CANCELED}
    # Nothing is left behind that would block the next build of this population.
    opened = registration.register_tasks(
        tm_client, "reg_pop", (training_of(protos), training_plans), (eval_of(protos), eval_plans)
    )
    assert [t.status for t in opened] == [STATUS.OPEN, STATUS.OPEN]


def test_a_second_active_training_task_is_a_conflict(tm_client, training_plans):
    protos = task_protos("TRAINING_ONLY")
    registration.register_tasks(tm_client, "reg_pop", (training_of(protos), training_plans))

    with pytest.raises(TaskConflictError) as info:
        registration.register_tasks(tm_client, "reg_pop", (training_of(protos), training_plans))

    assert info.value.http_status == 409
    statuses = sorted(t.status for t in tm_client.list_tasks("reg_pop"))
    assert statuses == [STATUS.OPEN]


def test_eval_only_task_names_an_existing_training_task(tm_client, training_plans, eval_plans):
    train = task_protos("TRAINING_ONLY")
    (trained,) = registration.register_tasks(
        tm_client, "reg_pop", (training_of(train), training_plans)
    )
    extra = f"federated_learning {{ evaluation {{ source_training_task_id: {trained.task_id} }} }}"
    protos = task_protos("EVAL_ONLY", extra)

    (evaluation,) = registration.register_tasks(tm_client, "reg_pop", (eval_of(protos), eval_plans))

    assert evaluation.status == STATUS.OPEN
    assert evaluation.info.evaluation_info.training_task_id == trained.task_id


def test_wrong_admin_key_is_refused(server_transport, training_plans):
    protos = task_protos("TRAINING_ONLY")
    client = registration.TaskManagementClient(
        SERVER_URL, api_key="wrong", transport=server_transport
    )

    with client, pytest.raises(TaskManagementError, match="401"):
        registration.register_tasks(client, "reg_pop", (training_of(protos), training_plans))


def test_unreachable_server_is_a_task_management_error(training_plans):
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    client = registration.TaskManagementClient(SERVER_URL, transport=httpx.MockTransport(refuse))
    protos = task_protos("TRAINING_ONLY")

    with (
        client,
        pytest.raises(TaskManagementError, match="Cannot reach the task management server"),
    ):
        registration.register_tasks(client, "reg_pop", (training_of(protos), training_plans))


def test_artifact_urls_outside_the_server_are_refused(tm_client):
    with pytest.raises(TaskManagementError, match="refusing artifact URL outside the server"):
        tm_client.put_artifact("http://elsewhere.test/upload", b"x")
