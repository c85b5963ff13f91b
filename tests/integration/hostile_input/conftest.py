"""Hostile-input fixtures: a server app on the parametrised database with live tasks to attack."""

import dataclasses

import numpy as np
import pytest

from fcp_server.app import create_app
from fcp_server.clock import ManualClock
from fcp_server.settings import ServerSettings
from fcp_server.storage.blobs import make_blob_store
from tests.integration.hostile_input import live


@pytest.fixture
def blobs(tmp_path):
    root = tmp_path / "blobs"
    root.mkdir()
    return make_blob_store(root.as_uri())


@pytest.fixture
def make_app(db_url, blobs):
    """Builds apps on one database and blob store; `overrides` change ServerSettings fields."""
    apps = []
    base = ServerSettings(
        database_url=db_url, embedded_worker=False, auto_migrate=False, log_format="text"
    )

    def build(**overrides):
        app = create_app(
            dataclasses.replace(base, **overrides),
            clock=ManualClock(),
            blobs=blobs,
            checkin_rng=np.random.default_rng(7),
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
def population(app):
    """Opens a training task in a fresh population; returns its live ids (see `live.open`)."""
    counter = iter(range(1_000_000))
    return lambda: live.open_population(app, f"live-{next(counter)}")
