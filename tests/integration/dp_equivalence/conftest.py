"""Fixtures of the DP equivalence tests: the saved example model and server settings."""

import shutil

import pytest

from fcp_server.settings import ServerSettings


@pytest.fixture(scope="session")
def dense_model(tmp_path_factory: pytest.TempPathFactory):
    """The dense_dict example saved as a FunctionalModel and loaded as the builder loads it."""
    pytest.importorskip("tensorflow_federated")
    from task_builder import model_loading
    from task_builder.examples import save_models

    path = save_models.save_example("dense_dict", tmp_path_factory.mktemp("dense_dict"))
    return model_loading.load_model(str(path))


@pytest.fixture
def server_settings(sqlite_template, tmp_path) -> ServerSettings:
    """Settings of a server on a migrated SQLite file and a local blob directory.

    SQLite only: the database stores the round bookkeeping, not the math under test, and the
    round close runs the same code on PostgreSQL (tests/integration/server covers both).
    """
    database = tmp_path / "fcp.db"
    shutil.copyfile(sqlite_template, database)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    return ServerSettings(
        database_url=f"sqlite:///{database}",
        blob_url=blobs.as_uri(),
        embedded_worker=False,
        auto_migrate=False,
        log_format="text",
    )
