"""A doorbell from the upload that completes a round's goal to the workers that close rounds.

Without it a worker learns that a round reached its goal only when it next looks: at its full
tick (`worker_interval_seconds`, 1 s by default) or at its close poll. The ring is a hint, never
the source of truth: the round's AGGREGATING status in the database is, so a lost ring only
costs the wait until the next tick or poll, and a spurious one one indexed query.

- PostgreSQL: `NOTIFY` on the channel `fcp_rounds_ready`, sent inside the transaction that moved
  the round to AGGREGATING (delivered only when it commits); workers `LISTEN` on a connection
  of their own, outside SQLAlchemy's pool.
- SQLite: web and worker processes share the database file, so they share a host; the ring is
  one byte written without blocking to a FIFO beside the file, `<database>-fcp-rounds-ready`,
  after the commit. Each listening worker keeps the FIFO open for reading (and for writing, so
  it never reads end-of-file); the byte wakes whichever worker reads it first, and any worker
  can close any round. With no worker listening the write fails at once (ENXIO) and is dropped.

Ringing never fails the caller: the upload was already counted, and the next tick closes the
round anyway. A listener that cannot be set up or breaks is logged and the worker waits as
before.
"""

import contextlib
import errno
import logging
import os
import select
import stat
from typing import Protocol

import psycopg
from sqlalchemy import Connection, text
from sqlalchemy.engine import URL, make_url

_LOG = logging.getLogger(__name__)
CHANNEL = "fcp_rounds_ready"
_FIFO_SUFFIX = "-fcp-rounds-ready"
_NOTIFY = text(f"SELECT pg_notify('{CHANNEL}', '')")


def fifo_path(database: str) -> str:
    """The doorbell FIFO of a SQLite database file."""
    return database + _FIFO_SUFFIX


def ring_in_transaction(conn: Connection) -> None:
    """Rings from inside the transaction that moved a round to AGGREGATING (PostgreSQL).

    PostgreSQL delivers the notification when the transaction commits, and drops it on
    rollback; on SQLite this does nothing (see `ring_after_commit`).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(_NOTIFY)


def ring_after_commit(database_url: str | URL) -> None:
    """Rings after that transaction committed (SQLite); best effort, never raises."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        return
    try:
        fd = os.open(fifo_path(url.database), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:  # no worker ever listened (ENOENT) or none listens now (ENXIO)
        if e.errno not in (errno.ENOENT, errno.ENXIO):
            _LOG.warning("round doorbell not rung: %s", e)
        return
    try:
        os.write(fd, b"\0")
    except BlockingIOError:
        pass  # the FIFO is full of earlier rings: a worker is already due to look
    except OSError as e:
        _LOG.warning("round doorbell not rung: %s", e)
    finally:
        os.close(fd)


class Listener(Protocol):
    """What the worker waits on between ticks."""

    def wait(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds; True if rung (possibly spuriously)."""

    def close(self) -> None:
        """Stops listening."""


class _FifoListener:
    def __init__(self, path: str) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkfifo(path, 0o600)
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise OSError(f"{path} exists and is not a FIFO")
        self._read = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # Our own write end: with no writer at all, the read end would report end-of-file,
        # i.e. readable, on every wait.
        self._keep = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def wait(self, timeout: float) -> bool:
        readable, _, _ = select.select([self._read], [], [], max(timeout, 0.0))
        if not readable:
            return False
        with contextlib.suppress(BlockingIOError):  # another worker took the byte first
            os.read(self._read, 4096)  # every ring so far: one look covers them all
        return True

    def close(self) -> None:
        os.close(self._read)
        os.close(self._keep)


class _PostgresListener:
    def __init__(self, url: str) -> None:
        parsed = make_url(url).set(drivername="postgresql")
        conninfo = parsed.render_as_string(hide_password=False)
        self._conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=10)
        self._conn.execute(f"LISTEN {CHANNEL}")

    def wait(self, timeout: float) -> bool:
        rung = False
        for _ in self._conn.notifies(timeout=max(timeout, 0.0), stop_after=1):
            rung = True
        if rung:  # drain what else arrived: one look covers them all
            for _ in self._conn.notifies(timeout=0.0):
                pass
        return rung

    def close(self) -> None:
        self._conn.close()


def listen(database_url: str) -> Listener | None:
    """A listener for the database's doorbell, or None when none can be set up (logged)."""
    url = make_url(database_url)
    try:
        if url.get_backend_name() == "postgresql":
            return _PostgresListener(database_url)
        if url.get_backend_name() == "sqlite" and url.database:
            return _FifoListener(fifo_path(url.database))
    except (OSError, psycopg.Error) as e:
        _LOG.warning("round doorbell unavailable, closing rounds on ticks and polls: %s", e)
    return None
