"""Warm start through the CLI flags, the build pipeline and the HTTP service's URL rule."""

import pathlib
from collections.abc import Iterable

import numpy as np
import pytest
from google.protobuf import text_format

from fcp_server import checkpoints
from fcp_server.aggregation.state import ModelWeights, ServerState, Tensor
from fcp_server.protos import plan_pb2, task_builder_pb2
from fcp_server.services import blob_paths
from fcp_server.storage import blobs
from task_builder import builder, cli, service
from task_builder.errors import BuildRequestError
from tests.integration.task_builder.conftest import digits_config

pytestmark = pytest.mark.filterwarnings(
    # scipy 1.9 (pinned by TFF) calls a numpy 1.25-deprecated function inside dp_accounting.
    "ignore:np.find_common_type is deprecated:DeprecationWarning"
)

PROTO = "application/x-protobuf"
ARTIFACTS = "/taskbuilder/v1:build-artifacts"
POP, TASK = "warm_pop", 7
STORE_URL = "gs://fcp-blobs"
CONFIG = """
mode: TRAINING_ONLY population_name: "svc_pop"
policies { model_release_policy { num_max_training_rounds: 5 dp_target_epsilon: 10 } }
federated_learning { learning_process { runtime_config { report_goal: 10 } } }
differential_privacy { clip_norm: 1 noise_multiplier: 2 population_size: 1000 }
"""
BASE = ["--saved_model", "m", "--task_config", "t.pbtxt"]


# --- CLI flags --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--warm_start_population", POP], "missing --warm_start_task"),
        (["--warm_start_round", "3"], "missing --warm_start_population, --warm_start_task"),
        (
            ["--local", "--warm_start_population", POP, "--warm_start_task", "7"],
            "missing --warm_start_blob_url",
        ),
        (["--warm_start_blob_url", "file:///b"], "missing --warm_start_population"),
        (["--warm_start_population", POP, "--warm_start_task", "0"], "positive task id"),
        (
            ["--warm_start_population", POP, "--warm_start_task", "7", "--warm_start_round", "-1"],
            "--warm_start_round must be >= 0",
        ),
    ],
)
def test_inconsistent_warm_start_flags_exit_2(extra, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(BASE + extra)

    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_warm_start_flags_fill_the_request(tmp_path):
    config = tmp_path / "task.pbtxt"
    config.write_text(CONFIG)
    flags = ["--saved_model", "m", "--task_config", str(config), "--local"]
    source = ["--warm_start_blob_url", "file:///b", "--warm_start_population", POP]

    latest = cli.make_request(cli.parse_args(flags + source + ["--warm_start_task", "7"]))
    pinned = cli.make_request(
        cli.parse_args(flags + source + ["--warm_start_task", "7", "--warm_start_round", "0"])
    )
    none = cli.make_request(cli.parse_args(flags))

    ws = latest.warm_start
    assert (ws.blob_url, ws.population_name, ws.task_id) == ("file:///b", POP, 7)
    assert not ws.HasField("round")  # unset = the latest round
    assert pinned.warm_start.HasField("round") and pinned.warm_start.round == 0
    assert not none.HasField("warm_start")


def test_remote_warm_start_may_leave_the_url_to_the_service(tmp_path):
    config = tmp_path / "task.pbtxt"
    config.write_text(CONFIG)
    args = cli.parse_args(
        [
            *("--saved_model", "m", "--task_config", str(config)),
            *("--warm_start_population", POP, "--warm_start_task", "7"),
        ]
    )

    assert cli.make_request(args).warm_start.blob_url == ""


# --- pipeline checks (before any TensorFlow) --------------------------------------------------


def _request(**warm_start) -> task_builder_pb2.BuildTaskRequest:
    request = task_builder_pb2.BuildTaskRequest(
        task_config=text_format.Parse(CONFIG, task_builder_pb2.TaskConfig())
    )
    request.warm_start.CopyFrom(task_builder_pb2.WarmStart(**warm_start))
    return request


@pytest.mark.parametrize(
    ("fields", "mode", "message"),
    [
        ({"blob_url": STORE_URL, "population_name": POP, "task_id": 1}, "EVAL_ONLY", "EVAL_ONLY"),
        ({"population_name": POP, "task_id": 1}, "TRAINING_ONLY", "needs blob_url"),
        ({"blob_url": STORE_URL, "population_name": POP}, "TRAINING_ONLY", "task_id must be"),
        (
            {"blob_url": STORE_URL, "population_name": POP, "task_id": 1, "round": -2},
            "TRAINING_ONLY",
            "round must be >= 0",
        ),
    ],
)
def test_builder_rejects_unusable_warm_starts(fields, mode, message):
    mode_value = task_builder_pb2.TaskMode.Enum.Value(mode)

    with pytest.raises(BuildRequestError, match=message):
        builder.check_warm_start(_request(**fields), mode_value)


# --- the service's URL rule -------------------------------------------------------------------


def test_service_fills_in_its_own_store():
    empty = _request(population_name=POP, task_id=TASK)
    same = _request(blob_url=STORE_URL + "/", population_name=POP, task_id=TASK)
    absent = task_builder_pb2.BuildTaskRequest()

    for request in (empty, same):
        service.resolve_warm_start(request, STORE_URL)
        assert request.warm_start.blob_url == STORE_URL
    service.resolve_warm_start(absent, None)
    assert not absent.HasField("warm_start")


@pytest.mark.parametrize(
    ("configured", "sent", "message"),
    [
        (STORE_URL, "file:///etc", "must be empty or this task builder's configured blob store"),
        (STORE_URL, "gs://other-bucket", "the service reads no other URL"),
        (None, "", "warm start is not enabled on this task builder"),
        (None, STORE_URL, "FCP_WARM_START_BLOB_URL is unset"),
    ],
)
def test_service_refuses_other_urls_with_400(configured, sent, message):
    settings = service.ServiceSettings(
        server_url="http://127.0.0.1:9", warm_start_blob_url=configured
    )
    client = service.create_app(settings).test_client()
    body = _request(blob_url=sent, population_name=POP, task_id=TASK).SerializeToString()

    reply = client.post(ARTIFACTS, data=body, content_type=PROTO)
    response = task_builder_pb2.BuildTaskResponse.FromString(reply.data)

    assert reply.status_code == 400
    assert response.error_info.error_type == task_builder_pb2.ErrorType.INVALID_REQUEST
    assert message in response.error_info.error_message
    assert sent not in response.error_info.error_message or not sent


def test_warm_start_store_setting_from_env():
    env = {"FCP_WARM_START_BLOB_URL": "gs://fcp-blobs"}

    assert service.ServiceSettings.from_env(env).warm_start_blob_url == "gs://fcp-blobs"
    assert service.ServiceSettings.from_env({}).warm_start_blob_url is None
    with pytest.raises(ValueError, match="file:// or gs://"):
        service.ServiceSettings(warm_start_blob_url="/var/blobs")


# --- a real local build from a stored round ---------------------------------------------------


def _random_weights(spec: plan_pb2.ModelSpec, rng: np.random.Generator) -> ModelWeights:
    def draw(tensors: Iterable[plan_pb2.TensorSpec]) -> tuple[Tensor, ...]:
        return tuple(rng.normal(size=tuple(t.shape)).astype(np.dtype(t.dtype)) for t in tensors)

    return ModelWeights(trainable=draw(spec.trainable), non_trainable=draw(spec.non_trainable))


@pytest.fixture(scope="module")
def source_rounds(digits_model_dir, tmp_path_factory):
    """A file:// store holding rounds 1 and 2 of an earlier task, as the FCP server writes them."""
    from task_builder import model_loading, plans

    spec = plans.build_model_spec(model_loading.load_model(str(digits_model_dir)))
    url = tmp_path_factory.mktemp("server-blobs").as_uri()
    store = blobs.make_blob_store(url)
    rng = np.random.default_rng(5)
    by_round = {}
    for n in (1, 2):
        weights = by_round[n] = _random_weights(spec, rng)
        momentum = {"momentum/0": np.ones_like(weights.trainable[0])}
        state = ServerState(weights, momentum, {}, n, {})
        store.put(
            blob_paths.server_checkpoint_blob(POP, TASK, n),
            checkpoints.encode_server_checkpoint(state),
        )
        store.put(
            blob_paths.client_checkpoint_blob(POP, TASK, n),
            checkpoints.encode_client_checkpoint(weights),
        )
    store.close()
    return url, spec, by_round


def _artifact_config(tmp_path: pathlib.Path) -> str:
    config = digits_config()
    config.mode = task_builder_pb2.TaskMode.TRAINING_ONLY
    config.ClearField("federated_learning")
    config.federated_learning.learning_process.runtime_config.report_goal = 20
    # Server momentum, so the new checkpoint has optimizer state that must start at zero.
    config.federated_learning.learning_process.server_momentum = 0.9
    building = config.federated_learning.learning_process.artifact_building
    building.plan_url = str(tmp_path / "a" / "plan.pb")
    building.client_plan_url = str(tmp_path / "a" / "client_only_plan.pb")
    building.checkpoint_url = str(tmp_path / "a" / "checkpoint")
    path = tmp_path / "task.pbtxt"
    path.write_text(text_format.MessageToString(config))
    return str(path)


def _local_build(model_dir: pathlib.Path, config_path: str, url: str, *extra: str) -> int:
    return cli.main(
        [
            *("--saved_model", str(model_dir), "--task_config", config_path, "--local"),
            *("--build_artifact_only", "--skip_flex_ops_check"),
            *("--warm_start_blob_url", url, "--warm_start_population", POP),
            *("--warm_start_task", str(TASK), *extra),
        ]
    )


@pytest.mark.tf
@pytest.mark.slow
def test_local_build_starts_from_the_latest_stored_round(
    digits_model_dir, source_rounds, tmp_path, capsys
):
    from task_builder import model_versions

    url, spec, by_round = source_rounds

    code = _local_build(digits_model_dir, _artifact_config(tmp_path), url)

    out = capsys.readouterr().out
    assert code == 0
    assert f'warm_start_from: "{POP}/{TASK} round 2"' in out
    initial = model_versions.weights_from_checkpoint(
        (tmp_path / "a" / "checkpoint").read_bytes(), spec
    )
    for got, want in zip(
        initial.trainable + initial.non_trainable,
        by_round[2].trainable + by_round[2].non_trainable,
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    tensors, _ = checkpoints.decode_tensors(
        (tmp_path / "a" / "checkpoint").read_bytes(), max_bytes=1 << 30
    )
    # Only the weights carry over: the source task's momentum does not.
    state = [v for k, v in tensors.items() if k.startswith("server_optimizer/")]
    assert state and all(not np.any(v) for v in state)


@pytest.mark.tf
def test_local_build_of_a_missing_round_fails_with_the_rounds_known(
    digits_model_dir, source_rounds, tmp_path, capsys
):
    url, _, _ = source_rounds

    code = _local_build(
        digits_model_dir, _artifact_config(tmp_path), url, "--warm_start_round", "9"
    )

    err = capsys.readouterr().err
    assert code == 1
    assert f"task {POP}/{TASK} has no checkpoint for round 9 (latest rounds: 1, 2)" in err
    assert not (tmp_path / "a").exists()
