"""Config and artifact I/O on local paths, file:// and gs:// (a real GCS API emulator)."""

import uuid

import pytest

from fcp_server.protos import task_builder_pb2
from task_builder import artifacts, task_config
from task_builder.errors import ArtifactBuildError

CONFIG = 'population_name: "gcs_pop" mode: TRAINING_ONLY'


def test_local_round_trip_creates_directories(tmp_path):
    target = tmp_path / "a" / "b" / "plan.pb"

    artifacts.write_uri(str(target), b"\x00\x01plan")

    assert artifacts.read_uri(target.as_uri(), max_bytes=100) == b"\x00\x01plan"
    assert [p.name for p in target.parent.iterdir()] == ["plan.pb"]  # no temp files left


def test_read_is_bounded(tmp_path):
    target = tmp_path / "big"
    target.write_bytes(b"x" * 11)

    with pytest.raises(artifacts.UriError, match="larger than 10 bytes"):
        artifacts.read_uri(str(target), max_bytes=10)


@pytest.mark.parametrize("uri", ["file://host/x", "http://example.com/x", "gs://bucket-only"])
def test_unsupported_uris(uri):
    with pytest.raises(artifacts.UriError):
        artifacts.read_uri(uri, max_bytes=10)


def test_write_failure_is_an_artifact_build_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    config = task_builder_pb2.TaskConfig(mode=task_builder_pb2.TaskMode.EVAL_ONLY)
    building = config.federated_learning.evaluation.artifact_building
    building.plan_url = str(blocker / "under_a_file" / "plan.pb")
    building.client_plan_url = str(tmp_path / "client.pb")

    class Eval:
        client_plan = task_builder_pb2.TaskConfig()  # any message serializes
        server_plan = task_builder_pb2.TaskConfig()
        initial_checkpoint = None

    with pytest.raises(ArtifactBuildError, match="Artifact failed to write to"):
        artifacts.write_artifacts(config, None, Eval())  # type: ignore[arg-type]


@pytest.mark.gcs
def test_gcs_round_trip_and_config_loading(gcs_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
    base = f"gs://{gcs_emulator.bucket}/builder-{uuid.uuid4().hex}"

    artifacts.write_uri(f"{base}/configs/task.pbtxt", CONFIG.encode())
    artifacts.write_uri(f"{base}/out/plan.pb", bytes(range(256)))

    loaded = task_config.load_task_config(f"{base}/configs/task.pbtxt")
    assert loaded.population_name == "gcs_pop"
    assert artifacts.read_uri(f"{base}/out/plan.pb", max_bytes=1000) == bytes(range(256))
    with pytest.raises(artifacts.UriError, match="cannot read"):
        artifacts.read_uri(f"{base}/missing", max_bytes=10)
