"""PostgreSQL pool: connections idle for a while are pinged before use, busy ones are not."""

import pytest
from sqlalchemy import exc, text

from fcp_server.storage import db as fcp_db
from tests.fixtures.db import _admin_connection

pytestmark = pytest.mark.postgres


@pytest.fixture
def pings(monkeypatch):
    """Records the pings the pool sends (observes the dialect's own ping, which still runs)."""
    sent = []
    dialect_cls = type(fcp_db.make_engine("postgresql://u@127.0.0.1/x").dialect)
    original = dialect_cls.do_ping

    def counted(self, dbapi_connection):
        sent.append(dbapi_connection)
        return original(self, dbapi_connection)

    monkeypatch.setattr(dialect_cls, "do_ping", counted)
    return sent


def _engine(url, monkeypatch, idle_seconds):
    monkeypatch.setattr(fcp_db, "PG_PING_IDLE_SECONDS", idle_seconds)
    return fcp_db.make_engine(url, pool_size=1, max_overflow=0)


def _backend_pid(engine):
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def _terminate(pid):
    with _admin_connection() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_connection_killed_while_idle_is_replaced_before_use(
    postgres_database_url, monkeypatch, pings
):
    engine = _engine(postgres_database_url, monkeypatch, idle_seconds=0.0)
    try:
        first = _backend_pid(engine)
        assert pings == []  # a new connection is not pinged
        _terminate(first)
        second = _backend_pid(engine)  # the ping fails, the pool connects again
        assert second != first
        assert len(pings) == 1
    finally:
        engine.dispose()


def test_a_connection_used_a_moment_ago_is_not_pinged(postgres_database_url, monkeypatch, pings):
    engine = _engine(postgres_database_url, monkeypatch, idle_seconds=3600.0)
    try:
        first = _backend_pid(engine)
        assert _backend_pid(engine) == first
        assert pings == []
        # Unpinged, a connection killed in between fails its statement; the pool then drops it
        # and the next checkout connects again.
        _terminate(first)
        with pytest.raises(exc.DBAPIError):
            _backend_pid(engine)
        assert _backend_pid(engine) != first
    finally:
        engine.dispose()


def test_an_explicit_pre_ping_still_pings_every_checkout(postgres_database_url, pings):
    engine = fcp_db.make_engine(postgres_database_url, pool_pre_ping=True, pool_size=1)
    try:
        _backend_pid(engine)
        _backend_pid(engine)
        assert len(pings) == 1  # the first checkout is a new connection
    finally:
        engine.dispose()
