"""`task_builder_client` end to end: flags, exit codes, remote and --local builds."""

import pytest
from google.protobuf import text_format

from fcp_server.protos import task_builder_pb2, task_pb2
from task_builder import cli, service
from tests.integration.task_builder.conftest import ADMIN_KEY, digits_config

pytestmark = pytest.mark.filterwarnings(
    # scipy 1.9 (pinned by TFF) calls a numpy 1.25-deprecated function inside dp_accounting.
    "ignore:np.find_common_type is deprecated:DeprecationWarning"
)

VALID = """
mode: TRAINING_ONLY population_name: "cli_pop"
policies { model_release_policy { num_max_training_rounds: 5 } }
federated_learning { learning_process { runtime_config { report_goal: 10 } } }
differential_privacy { clip_norm: 1 noise_multiplier: 2 population_size: 1000 }
"""


@pytest.fixture
def write_config(tmp_path):
    def write(text, name="task.pbtxt"):
        path = tmp_path / name
        path.write_text(text if isinstance(text, str) else text_format.MessageToString(text))
        return str(path)

    return write


def test_saved_model_and_task_config_are_required(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--task_config", "x.pbtxt"])

    assert info.value.code == 2
    assert "--saved_model" in capsys.readouterr().err


def test_unreadable_config_exits_1(tmp_path, capsys):
    code = cli.main(["--saved_model", "m", "--task_config", str(tmp_path / "none.pbtxt")])

    assert code == 1
    assert "Build failed: [Invalid task config]: cannot read" in capsys.readouterr().err


def test_local_invalid_config_exits_1_with_the_message(write_config, capsys):
    path = write_config(VALID.replace("report_goal: 10", "report_goal: -1"))

    code = cli.main(["--saved_model", "m", "--task_config", path, "--local"])

    err = capsys.readouterr().err
    assert code == 1
    assert "Build failed (INVALID_REQUEST): [Invalid task config]: key `report_goal`" in err


def test_population_name_flag_overrides_the_config(write_config):
    path = write_config(VALID)
    args = cli.parse_args(["--saved_model", "m", "--task_config", path, "--population_name", "x"])

    request = cli.make_request(args)

    assert request.task_config.population_name == "x"
    assert request.saved_model.uri == "m"


def test_remote_error_reply_exits_1_and_prints_the_report(write_config, serve_http, capsys):
    builder_url = serve_http(service.create_app(service.ServiceSettings()))
    over_budget = VALID.replace(
        "num_max_training_rounds: 5", "num_max_training_rounds: 5 dp_target_epsilon: 0.001"
    )
    path = write_config(over_budget)

    code = cli.main(
        ["--saved_model", "m", "--task_config", path, "--task_builder_server", builder_url + "/"]
    )

    err = capsys.readouterr().err
    assert code == 1
    assert "not private enough to pass DP accounting check" in err
    assert "dp_hyperparameters" in err


def test_unreachable_builder_exits_1(write_config, capsys):
    code = cli.main(
        [
            "--saved_model",
            "m",
            "--task_config",
            write_config(VALID),
            "--task_builder_server",
            "http://127.0.0.1:9/",
        ]
    )

    assert code == 1
    assert "cannot reach the task builder" in capsys.readouterr().err


@pytest.mark.tf
@pytest.mark.slow
def test_remote_build_registers_tasks_and_prints_the_report(
    digits_model_dir, write_config, serve_http, server_app, tm_client, capsys
):
    server_url = serve_http(server_app)
    settings = service.ServiceSettings(server_url=server_url, admin_api_key=ADMIN_KEY)
    builder_url = serve_http(service.create_app(settings))
    path = write_config(digits_config())

    code = cli.main(
        [
            "--saved_model",
            str(digits_model_dir),
            "--task_config",
            path,
            "--task_builder_server",
            builder_url,
            "--population_name",
            "cli_digits",
        ]
    )

    out = capsys.readouterr().out
    assert code == 0, capsys.readouterr().err
    assert out.startswith("Success! Tasks are built\n")
    report_text = out.split("\n", 1)[1].split("training_task {")[0]
    report = text_format.Parse(report_text, task_builder_pb2.TaskReport())
    assert report.applied_algorithms.dp_aggregator == "FIXED_GAUSSIAN"
    statuses = {t.status for t in tm_client.list_tasks("cli_digits")}
    assert statuses == {task_pb2.TaskStatus.OPEN}


@pytest.mark.tf
@pytest.mark.slow
def test_local_artifact_only_build_writes_files(digits_model_dir, write_config, tmp_path, capsys):
    config = digits_config()
    config.mode = task_builder_pb2.TaskMode.TRAINING_ONLY
    config.ClearField("federated_learning")
    config.federated_learning.learning_process.runtime_config.report_goal = 20
    building = config.federated_learning.learning_process.artifact_building
    building.plan_url = str(tmp_path / "a" / "plan.pb")
    building.client_plan_url = str(tmp_path / "a" / "client_only_plan.pb")
    building.checkpoint_url = str(tmp_path / "a" / "checkpoint")

    code = cli.main(
        [
            "--saved_model",
            str(digits_model_dir),
            "--task_config",
            write_config(config),
            "--local",
            "--build_artifact_only",
            "--skip_flex_ops_check",
        ]
    )

    out = capsys.readouterr().out
    assert code == 0
    assert "Success! Tasks are built" in out
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "checkpoint",
        "client_only_plan.pb",
        "plan.pb",
    ]
    assert 'min_client_version: "0"' in out  # the flex-op check was skipped
