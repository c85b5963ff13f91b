"""Read-only transactions (`Database.reads`): on SQLite outside the writers' queue, refusing writes.

As in test_sqlite_writers, the queue is seen from outside with a non-blocking flock; the thread
test only bounds how long it waits for a reader that must finish, so a reader stuck behind
the writer fails instead of hanging.
"""

import datetime as dt
import threading

import pytest
from sqlalchemy import exc, select, text, update

from fcp_server.services import round_close
from fcp_server.storage import transitions
from fcp_server.storage.models import EntityKind, StatusChange, Task, TaskStatus
from tests.integration.storage.test_sqlite_writers import _queue_held, sqlite_database  # noqa: F401


def _record(session, entity_id):
    transitions.record_change(
        session, EntityKind.TASK, entity_id, None, TaskStatus.OPEN, now=dt.datetime.now(dt.UTC)
    )


def test_a_read_transaction_leaves_the_writers_queue_alone(sqlite_database):  # noqa: F811
    # Arrange
    database, path = sqlite_database
    # Act
    with database.reads() as session, session.begin():
        session.execute(text("SELECT count(*) FROM status_history")).scalar_one()
        held_while_reading = _queue_held(path)
    # Assert
    assert not held_while_reading


def test_a_reader_sees_the_last_commit_while_a_writer_holds_the_queue(sqlite_database):  # noqa: F811
    # Arrange: one committed row, then a writer that added a second and has not committed
    database, path = sqlite_database
    with database.sessions() as session, session.begin():
        _record(session, 1)
    seen: list[int] = []
    reader = threading.Thread(
        target=lambda: seen.append(_count_tasks(database)), name="reader", daemon=True
    )
    # Act
    with database.sessions() as writer, writer.begin():
        _record(writer, 2)
        assert _queue_held(path)
        reader.start()
        reader.join(timeout=20)
        done_under_writer = not reader.is_alive()
    reader.join(timeout=60)
    # Assert: it did not wait for the writer, and saw only what was committed
    assert done_under_writer and seen == [1]


def _count_tasks(database) -> int:
    with database.reads() as session, session.begin():
        return session.execute(text("SELECT count(*) FROM status_history")).scalar_one()


def test_a_write_through_a_reader_fails(sqlite_database):  # noqa: F811
    # Arrange
    database, _ = sqlite_database
    # Act / Assert
    with pytest.raises(exc.OperationalError, match="readonly"):
        _write_through_reader(database)


def _write_through_reader(database) -> None:
    with database.reads() as session, session.begin():
        session.execute(update(StatusChange).values(reason="x"))


def test_the_worker_looks_for_rounds_to_close_outside_the_queue(sqlite_database):  # noqa: F811
    # Arrange: a writer holds the queue (an upload committing, a check-in)
    database, path = sqlite_database
    deps = round_close.Deps(
        database=database,
        blobs=None,  # type: ignore[arg-type]
        clock=None,  # type: ignore[arg-type]
        settings=None,  # type: ignore[arg-type]
        plans=None,  # type: ignore[arg-type]
        rng_factory=None,  # type: ignore[arg-type]
    )
    found: list[list[int]] = []
    poll = threading.Thread(
        target=lambda: found.append(round_close.aggregating_rounds(deps)), daemon=True
    )
    # Act
    with database.sessions() as writer, writer.begin():
        writer.execute(select(Task.id)).all()
        assert _queue_held(path)
        poll.start()
        poll.join(timeout=20)
        done_under_writer = not poll.is_alive()
    poll.join(timeout=60)
    # Assert
    assert done_under_writer and found == [[]]


def test_postgresql_reads_share_the_sessions(db_url):
    # Arrange
    from fcp_server.storage import db as fcp_db

    database = fcp_db.connect(db_url)
    try:
        # Act / Assert: one pool on PostgreSQL (MVCC readers never queue there)
        if database.engine.dialect.name == "postgresql":
            assert database.reads is database.sessions and database.read_engine is None
        else:
            assert database.read_engine is not None and database.reads is not database.sessions
    finally:
        database.dispose()
