"""SQLite writers queue on a lock file (`storage.sqlite_writers`) from BEGIN to COMMIT/ROLLBACK.

Whether the queue is held is seen from outside, as another process would: a non-blocking
flock on a file description of our own. No timing is asserted; the thread tests only bound
how long they wait for a thread that must finish, so a broken queue fails instead of hanging.
"""

import fcntl
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import exc, text

from fcp_server.services import checkin
from fcp_server.storage import db as fcp_db
from fcp_server.storage import sqlite_writers

_HOLD = """
import sys, time
from sqlalchemy import text
from fcp_server.storage import db
engine = db.make_engine(sys.argv[1])
with engine.begin() as conn:
    conn.execute(text("SELECT 1"))
    print("holding", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def sqlite_database(sqlite_template, tmp_path):
    path = tmp_path / "fcp.db"
    path.write_bytes(sqlite_template.read_bytes())
    database = fcp_db.connect(f"sqlite:///{path}")
    yield database, path
    database.dispose()


def _queue_held(path: Path) -> bool:
    fd = os.open(sqlite_writers.lock_path(str(path)), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops our flock too
    return False


def test_a_write_transaction_holds_the_queue_until_commit(sqlite_database):
    # Arrange
    database, path = sqlite_database
    # Act / Assert
    with database.engine.connect() as conn:
        assert not _queue_held(path)
        conn.execute(text("SELECT 1"))  # autobegin: BEGIN IMMEDIATE
        assert _queue_held(path)
        conn.commit()
        assert not _queue_held(path)


@pytest.mark.parametrize("end", ["rollback", "close", "invalidate"])
def test_every_way_out_of_a_transaction_leaves_the_queue(sqlite_database, end):
    # Arrange
    database, path = sqlite_database
    conn = database.engine.connect()
    conn.execute(text("SELECT 1"))
    assert _queue_held(path)
    # Act
    if end == "rollback":
        conn.rollback()
    elif end == "invalidate":
        conn.invalidate()
    conn.close()
    # Assert
    assert not _queue_held(path)


def test_a_second_writer_waits_for_the_first_and_then_proceeds(sqlite_database):
    # Arrange
    database, path = sqlite_database
    first = database.engine.connect()
    first.execute(text("SELECT 1"))
    entered, done = threading.Event(), threading.Event()

    def second() -> None:
        entered.set()
        with database.engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        done.set()

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    entered.wait()
    # Act
    first.commit()
    first.close()
    # Assert
    thread.join(timeout=60)
    assert done.is_set()
    assert not _queue_held(path)


def test_a_thread_holding_the_queue_does_not_wait_for_itself(sqlite_database):
    # Arrange: one thread in a transaction opens a second one on another connection. Without
    # the guard it would wait for its own flock forever; with it, it meets SQLite's lock.
    database, _ = sqlite_database
    outcome: list[BaseException] = []

    def nested() -> None:
        with database.engine.connect() as outer:
            outer.execute(text("SELECT 1"))
            with database.engine.connect() as inner:
                # On the driver: a statement through SQLAlchemy would already begin.
                inner.connection.dbapi_connection.execute("PRAGMA busy_timeout=50")
                try:
                    inner.execute(text("SELECT 1"))
                except exc.OperationalError as e:
                    outcome.append(e)

    thread = threading.Thread(target=nested, daemon=True)
    # Act
    thread.start()
    thread.join(timeout=60)
    # Assert
    assert not thread.is_alive()
    assert len(outcome) == 1 and "locked" in str(outcome[0])


def test_a_killed_writer_releases_the_queue(sqlite_database):
    # Arrange
    database, path = sqlite_database
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(database.engine.url)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        assert _queue_held(path)
        # Act
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # Assert
    assert not _queue_held(path)
    with database.engine.begin() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1


def test_an_anonymous_sqlite_check_in_takes_the_write_lock_at_its_first_statement(
    sqlite_database,
):
    # Arrange
    database, path = sqlite_database
    # Act / Assert
    with checkin.transaction(database, None) as conn:
        assert not _queue_held(path)
        conn.execute(text("SELECT 1"))
        assert _queue_held(path)
    assert not _queue_held(path)
