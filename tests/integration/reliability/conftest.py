"""Reliability fixtures: server settings on the parametrised database (SQLite and PostgreSQL)."""

import pytest

from fcp_server.settings import ServerSettings


@pytest.fixture
def settings(db_url):
    return ServerSettings(
        database_url=db_url, embedded_worker=False, auto_migrate=False, log_format="text"
    )
