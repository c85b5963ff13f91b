"""Server fixtures: an app on the parametrised database (SQLite and PostgreSQL), a local blob
store, a manual clock and a worker that ticks on demand."""

import dataclasses

import numpy as np
import pytest

from fcp_server.aggregation import make_noise_rng
from fcp_server.app import create_app
from fcp_server.clock import ManualClock
from fcp_server.services.plan_cache import PlanCache
from fcp_server.services.round_close import Deps
from fcp_server.settings import ServerSettings
from fcp_server.storage.blobs import make_blob_store
from fcp_server.worker import Worker
from tests.integration.server import testkit
from tests.integration.server.testkit import Api


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def blobs(tmp_path):
    root = tmp_path / "blobs"
    root.mkdir()
    return make_blob_store(root.as_uri())


@pytest.fixture
def settings(db_url):
    return ServerSettings(
        database_url=db_url, embedded_worker=False, auto_migrate=False, log_format="text"
    )


@pytest.fixture
def make_app(settings, blobs, clock):
    apps = []

    def build(**overrides):
        app = create_app(
            dataclasses.replace(settings, **overrides),
            clock=clock,
            blobs=blobs,
            checkin_rng=np.random.default_rng(1234),
        )
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["fcp"].database.dispose()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def api(app):
    return Api(app.test_client())


@pytest.fixture
def ctx(app):
    return app.extensions["fcp"]


@pytest.fixture
def worker(ctx):
    deps = Deps(
        database=ctx.database,
        blobs=ctx.blobs,
        clock=ctx.clock,
        settings=ctx.settings,
        plans=PlanCache(),
        rng_factory=make_noise_rng,
        metrics=ctx.metrics,
    )
    return Worker(deps)


@pytest.fixture
def reported(api):
    """An open task (goal 2) and one assignment that reported COMPLETED."""
    api.open_training(testkit.training_task(report_goal=2, max_size=4))
    a = api.assign()
    resp, answer = api.report(a)
    assert resp.status_code == 200
    return a, answer.upload_instruction.upload_location
