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

The wait is bounded, as SQLite's busy timeout bounds its own: a blocking flock(2) cannot time
out, so a contended wait runs on a thread of a small pool, on a file description of its own,
while the writer waits for it at most `wait_seconds`. A writer whose turn does not come by then
(a holder stopped mid-transaction) goes on without the queue: `BEGIN IMMEDIATE` then meets
SQLite's lock and busy timeout, so the request fails with the database's error (a 503), never
hangs. The abandoned wait releases the flock as soon as it gets it.
"""

import concurrent.futures
import dataclasses
import fcntl
import functools
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


def connection_factory(database: str, wait_seconds: float) -> type[sqlite3.Connection]:
    """A `sqlite3.Connection` subclass queueing its write transactions on `database`'s lock file.

    Pass it as sqlite3's `factory`; call `enter_queue()` before `BEGIN IMMEDIATE`. `commit`,
    `rollback` and `close` leave the queue once SQLite has finished them. A writer waits at
    most `wait_seconds` for its turn, then goes on without it (see the module docstring).
    """
    path = lock_path(database)

    class QueuedConnection(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._fcp_fd = _open(path)
            # The description holding the flock: our own, or a waiter's (closed to release).
            self._fcp_lock_fd: int | None = None
            self._fcp_held: set[str] = set()  # the holding thread's set, once holding
            # Every description this connection has open; closed also when the connection is
            # dropped without close(), which drops its flock.
            self._fcp_fds = [self._fcp_fd]
            self._fcp_closer = weakref.finalize(self, _close_all, self._fcp_fds)

        def enter_queue(self) -> None:
            """Waits for this server's other writers to finish, unless this thread is one."""
            if self._fcp_lock_fd is not None:
                return
            held = _held_here()
            if path in held:  # this thread holds it through another connection
                return
            try:
                fcntl.flock(self._fcp_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock_fd: int | None = self._fcp_fd
            except BlockingIOError:
                lock_fd = _wait_for_turn(path, wait_seconds)
            if lock_fd is None:
                return  # no turn in time: BEGIN IMMEDIATE waits (and fails) as without a queue
            if lock_fd != self._fcp_fd:
                self._fcp_fds.append(lock_fd)
            self._fcp_lock_fd, self._fcp_held = lock_fd, held
            held.add(path)

        def leave_queue(self) -> None:
            """Lets the next writer in (no-op when not holding)."""
            lock_fd, self._fcp_lock_fd = self._fcp_lock_fd, None
            if lock_fd is None:
                return
            self._fcp_held.discard(path)
            if lock_fd == self._fcp_fd:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
            else:
                self._fcp_fds.remove(lock_fd)
                os.close(lock_fd)  # a waiter's description: closing it drops the flock

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
                self.leave_queue()
                self._fcp_closer()  # closing the fd drops the flock

    return QueuedConnection


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def _open(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@dataclasses.dataclass
class _Wait:
    """One contended wait: a file description of its own, flocked on a pool thread."""

    fd: int
    turn: threading.Event = dataclasses.field(default_factory=threading.Event)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    abandoned: bool = False

    def run(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)  # sleeps in the kernel until our turn
        except OSError:
            os.close(self.fd)
            return
        with self.lock:
            if self.abandoned:
                os.close(self.fd)  # the writer went on without us: let the next one in
            else:
                self.turn.set()


def _wait_for_turn(path: str, wait_seconds: float) -> int | None:
    """A new description of `path` holding its flock, or None after `wait_seconds`."""
    wait = _Wait(_open(path))
    try:
        _waiters().submit(wait.run)
    except RuntimeError:  # the pool is shut down (interpreter exit)
        os.close(wait.fd)
        return None
    if wait.turn.wait(wait_seconds):
        return wait.fd
    with wait.lock:
        if wait.turn.is_set():
            return wait.fd
        wait.abandoned = True
    return None


@functools.cache
def _waiters() -> concurrent.futures.ThreadPoolExecutor:
    # More than a process's concurrent writers (gunicorn threads, the worker's threads).
    return concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="fcp-sqlite-queue")


# A forked child inherits the pool object but not its threads: it must make its own.
os.register_at_fork(after_in_child=_waiters.cache_clear)


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
