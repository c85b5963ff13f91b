"""Fixtures for the task builder's integration tests: a real FCP server app to register with.

The server is `fcp_server.app.create_app` on a migrated SQLite (and PostgreSQL) database and a
local blob directory; the builder reaches it through `httpx.WSGITransport`, so every call goes
through the real HTTP API.
"""

import dataclasses
import pathlib
import threading

import httpx
import pytest

from fcp_server.app import create_app
from fcp_server.protos import plan_pb2, task_builder_pb2
from fcp_server.settings import ServerSettings
from fcp_server.storage.blobs import make_blob_store
from task_builder import task_config
from task_builder.registration import TaskManagementClient
from tests.integration.server import testkit

ADMIN_KEY = "admin-secret"
SERVER_URL = "http://fcp-server.test"


@dataclasses.dataclass(frozen=True)
class Plans:
    """Real server-valid artifacts with the shape of task_builder.plans.TaskPlans."""

    client_plan: plan_pb2.ClientOnlyPlan
    server_plan: plan_pb2.ServerPlan
    initial_checkpoint: bytes | None
    flex_ops: list[str]
    min_client_version: str


@pytest.fixture
def server_app(tmp_path, db_url):
    settings = ServerSettings(
        database_url=db_url,
        embedded_worker=False,
        auto_migrate=False,
        log_format="text",
        admin_api_key=ADMIN_KEY,
    )
    blobs_dir = tmp_path / "server-blobs"
    blobs_dir.mkdir()
    app = create_app(settings, blobs=make_blob_store(blobs_dir.as_uri()))
    yield app
    app.extensions["fcp"].database.dispose()


@pytest.fixture
def server_transport(server_app):
    return httpx.WSGITransport(app=server_app)


@pytest.fixture
def tm_client(server_transport):
    with TaskManagementClient(SERVER_URL, api_key=ADMIN_KEY, transport=server_transport) as c:
        yield c


@pytest.fixture
def training_plans():
    return Plans(
        client_plan=testkit.client_plan(),
        server_plan=testkit.server_plan(report_goal=3),
        initial_checkpoint=testkit.initial_checkpoint(),
        flex_ops=[],
        min_client_version="0",
    )


@pytest.fixture
def eval_plans():
    kind = plan_pb2.PlanKind.EVALUATION
    return Plans(
        client_plan=testkit.client_plan(kind),
        server_plan=testkit.server_plan(report_goal=2, kind=kind),
        initial_checkpoint=None,
        flex_ops=[],
        min_client_version="0",
    )


@pytest.fixture(scope="session")
def digits_model_dir(tmp_path_factory):
    """The example digits CNN saved once as a real FunctionalModel (needs TFF)."""
    pytest.importorskip("tensorflow_federated")
    from task_builder.examples import save_models

    return save_models.save_example("digits_cnn", tmp_path_factory.mktemp("models"))


@pytest.fixture
def serve_http():
    """Serves WSGI apps on loopback ports in threads; returns their base URLs."""
    from werkzeug.serving import make_server

    servers = []

    def start(app):
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        thread.join(timeout=10)


def digits_config(*, noise: float = 1.0) -> task_builder_pb2.TaskConfig:
    """The shipped digits config with an explicit noise multiplier (no slow calibration)."""
    path = pathlib.Path(__file__).parents[3] / "configs" / "digits_cnn_task.pbtxt"
    config = task_config.load_task_config(str(path))
    config.differential_privacy.noise_multiplier = noise
    return config
