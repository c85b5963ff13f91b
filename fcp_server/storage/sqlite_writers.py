"""A cross-process queue in front of SQLite's write lock: an flock(2) on a file beside the database.

Every write transaction starts with `BEGIN IMMEDIATE` (`storage.db`). A writer that finds the
lock taken waits in SQLite's default busy handler, which sleeps 1, 2, 5, 10, ... ms between
tries (`sqliteDefaultBusyCallback` in sqlite3.c), so under contention the lock sits idle while
every waiter sleeps. Here each connection first takes an exclusive flock on
`<database>-fcp-writers.lock` (an open file of its own, so each connection is a separate
holder), from just before `BEGIN IMMEDIATE` until its COMMIT or ROLLBACK returns: waiters sleep
in the kernel and one of them takes the lock as soon as it is released.

The flock only orders this server's writers; SQLite's own lock still excludes (a writer that
skips the queue, e.g. the sqlite3 shell, meets the busy handler as before). The kernel drops
the flock of a process that dies, and closing a connection drops its flock. A thread that
already holds the flock through another connection does not queue again (it would wait for
itself forever): it goes straight to `BEGIN IMMEDIATE`, exactly as without the queue.

The wait is not bounded (flock(2) cannot time out): a writer stopped in the middle of a
transaction (SIGSTOP, a frozen container) holds the others until it goes on or dies; without
the queue they failed with "database is locked" (a 503) after the busy timeout. Nothing inside
a transaction waits unboundedly (blob calls are bounded by `FCP_BLOB_TIMEOUT_SECONDS`), and
gunicorn kills a worker whose heartbeat stops. A bounded wait (the contended flock on a pool
thread, the writer waiting for it with a timeout) was measured: its thread hand-offs under the
GIL took SQLite check-ins from 713-1,110/s down to 460-621/s, so it is not used.
"""

import fcntl
import os
import sqlite3
import threading
import weakref
from typing import Any

_SUFFIX = "-fcp-writers.lock"
# The lock files this thread holds a flock on, through any of its connections.
_held = threading.local()


def lock_path(database: str) -> str:
    """The queue's lock file for a database file path."""
    return database + _SUFFIX


def _held_here() -> set[str]:
    held: set[str] | None = getattr(_held, "paths", None)
    if held is None:
        held = _held.paths = set()
    return held


def connection_factory(database: str) -> type[sqlite3.Connection]:
    """A `sqlite3.Connection` subclass queueing its write transactions on `database`'s lock file.

    Pass it as sqlite3's `factory`; call `enter_queue()` before `BEGIN IMMEDIATE`. `commit`,
    `rollback` and `close` leave the queue once SQLite has finished them.
    """
    path = lock_path(database)

    class QueuedConnection(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._fcp_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fcp_holding = False
            self._fcp_held: set[str] = set()  # the holding thread's set, once holding
            # Also when the connection is dropped without close(): the fd (and flock) go.
            self._fcp_closer = weakref.finalize(self, os.close, self._fcp_fd)

        def enter_queue(self) -> None:
            """Waits for this server's other writers to finish, unless this thread is one."""
            if self._fcp_holding:
                return
            held = _held_here()
            if path in held:  # this thread holds it through another connection
                return
            fcntl.flock(self._fcp_fd, fcntl.LOCK_EX)
            self._fcp_holding, self._fcp_held = True, held
            held.add(path)

        def leave_queue(self) -> None:
            """Lets the next writer in (no-op when not holding)."""
            if not self._fcp_holding:
                return
            self._fcp_holding = False
            self._fcp_held.discard(path)
            fcntl.flock(self._fcp_fd, fcntl.LOCK_UN)

        def commit(self) -> None:
            try:
                super().commit()
            finally:
                self.leave_queue()

        def rollback(self) -> None:
            try:
                super().rollback()
            finally:
                self.leave_queue()

        def close(self) -> None:
            try:
                super().close()
            finally:
                if self._fcp_holding:
                    self._fcp_holding = False
                    self._fcp_held.discard(path)
                self._fcp_closer()  # closing the fd drops the flock

    return QueuedConnection


def enter_queue(dbapi_connection: Any) -> None:
    """`enter_queue()` of a queued connection; nothing for any other."""
    enter = getattr(dbapi_connection, "enter_queue", None)
    if enter is not None:
        enter()


def leave_queue(dbapi_connection: Any) -> None:
    """`leave_queue()` of a queued connection; nothing for any other."""
    leave = getattr(dbapi_connection, "leave_queue", None)
    if leave is not None:
        leave()
