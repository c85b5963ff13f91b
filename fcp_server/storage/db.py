"""Database connection: engine and session factory from a URL, and Alembic schema upgrades.

SQLite (the embedded default) is opened in WAL mode with a busy timeout and foreign keys on,
and every transaction starts with `BEGIN IMMEDIATE`: SQLite cannot upgrade a read lock to a
write lock under contention (it fails with "database is locked" instead of waiting), so writers
take the lock up front and simply queue, first on a lock file of this server's writers
(`sqlite_writers`), which hands the lock on without the busy handler's sleeps. Transactions
that only read take `Database.reads` instead: on SQLite a second pool whose connections are
`query_only` and begin a plain (deferred) `BEGIN`, outside the writers' queue, since in WAL mode
a reader sees the last commit and neither waits for writers nor holds them up. PostgreSQL
(`postgresql+psycopg://`) runs at READ COMMITTED; correctness there comes from the conditional
UPDATEs in `transitions`. A pooled PostgreSQL connection is tested with a `SELECT 1` before use
only when it sat idle for `PG_PING_IDLE_SECONDS` (the pessimistic disconnect handling of
SQLAlchemy's pooling guide, limited to connections that could have gone stale): pinging every
checkout cost one round trip per request. A connection that breaks while in use is invalidated,
with the rest of the pool, by SQLAlchemy's disconnect detection, and the request answers 503
(`storage.availability`).

Sessions never commit by themselves: the request or CLI boundary owns `with session.begin():`
(SQLAlchemy 2.0 session basics), and `expire_on_commit=False` keeps returned rows readable.
"""

import dataclasses
import time
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from fcp_server import fault_points
from fcp_server.storage import sqlite_writers

SQLITE_BUSY_TIMEOUT_MS = 30_000
# libpq waits forever for an unresponsive server by default; a request must get its 503 first.
PG_CONNECT_TIMEOUT_S = 10
# Pooled PostgreSQL connections idle at least this long are pinged before use.
PG_PING_IDLE_SECONDS = 1.0
_SUPPORTED_BACKENDS = ("sqlite", "postgresql")


@dataclasses.dataclass(frozen=True)
class Database:
    """An engine and the session factory bound to it."""

    engine: Engine
    sessions: sessionmaker[Session]
    # Sessions for transactions that only read (see the module docstring); on SQLite bound
    # to `read_engine`, which refuses writes. None: `sessions` serve reads too.
    read_engine: Engine | None = None
    read_sessions: sessionmaker[Session] | None = None

    @property
    def reads(self) -> sessionmaker[Session]:
        """The session factory of read-only transactions."""
        return self.read_sessions or self.sessions

    def dispose(self) -> None:
        """Closes every pooled connection."""
        self.engine.dispose()
        if self.read_engine is not None:
            self.read_engine.dispose()


def make_engine(url: str, *, read_only: bool = False, **kwargs: Any) -> Engine:
    """Creates an engine for a sqlite:// or postgresql(+psycopg):// URL.

    Args:
        url: SQLAlchemy database URL.
        read_only: SQLite only: connections refuse writes (`PRAGMA query_only`) and their
            transactions begin deferred, outside the writers' queue.
        **kwargs: Extra `create_engine` arguments (e.g. `poolclass`).

    Returns:
        The engine, with SQLite connections configured for concurrent processes.

    Raises:
        ValueError: The URL names an unsupported backend.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend not in _SUPPORTED_BACKENDS:
        raise ValueError(f"database URL must be sqlite:// or postgresql://, got {backend!r}")
    if backend == "postgresql" and parsed.drivername == "postgresql":
        # psycopg 3 is the installed driver; plain postgresql:// would ask for psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        # The sqlite3 module's own transaction handling is switched off so BEGIN is ours.
        connect_args = kwargs.setdefault("connect_args", {})
        connect_args["isolation_level"] = None
        if parsed.database in (None, "", ":memory:"):
            raise ValueError("in-memory SQLite cannot be shared between sessions; use a file")
        # Writers queue on a lock file before BEGIN IMMEDIATE (`sqlite_writers`).
        connect_args.setdefault("factory", sqlite_writers.connection_factory(parsed.database))
        # Pooled, one connection per thread at a time: a fresh connection per session (NullPool)
        # re-ran the PRAGMAs and, closing the last one, checkpointed the WAL on every request.
        kwargs.setdefault("poolclass", QueuePool)
    else:
        if "connect_timeout" not in parsed.query:  # a URL's own ?connect_timeout= wins
            kwargs.setdefault("connect_args", {}).setdefault(
                "connect_timeout", PG_CONNECT_TIMEOUT_S
            )
    engine = create_engine(parsed, **kwargs)
    if backend == "sqlite":
        (_configure_sqlite_reader if read_only else _configure_sqlite)(engine)
    elif not kwargs.get("pool_pre_ping"):  # a caller's pre-ping on every checkout wins
        _ping_idle_connections(engine, PG_PING_IDLE_SECONDS)
    if fault_points.armed() and not read_only:  # crash tests: a kill point before every COMMIT
        event.listen(engine, "commit", lambda _conn: fault_points.hit("db.commit"))
    return engine


def _ping_idle_connections(engine: Engine, idle_seconds: float) -> None:
    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["fcp_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("fcp_idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < idle_seconds:
            return  # new, or used a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)  # what pool_pre_ping runs
        except Exception as e:  # any failure: the pool discards it and checks out another
            raise exc.DisconnectionError(f"stale pooled connection: {e}") from e


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            # A new database: switching to WAL needs an exclusive lock, and SQLite refuses it
            # at once ("database is locked", no busy wait) while another process is in a write
            # transaction, e.g. a gunicorn worker migrating it. The writers' queue waits for
            # that transaction to end. WAL stays set in the file, so this happens once.
            sqlite_writers.enter_queue(dbapi_connection)
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
            finally:
                sqlite_writers.leave_queue(dbapi_connection)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        dbapi_connection = connection.connection.dbapi_connection
        sqlite_writers.enter_queue(dbapi_connection)  # left when COMMIT or ROLLBACK returns
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            sqlite_writers.leave_queue(dbapi_connection)
            raise


def _configure_sqlite_reader(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # A write through a reader is a bug: it fails at once instead of racing the writers.
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


def connect(url: str, **kwargs: Any) -> Database:
    """Opens a database: the engine plus session factories with `expire_on_commit=False`."""
    engine = make_engine(url, **kwargs)
    database = Database(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))
    if engine.dialect.name != "sqlite":
        return database
    reader = make_engine(url, read_only=True, **kwargs)
    return dataclasses.replace(
        database, read_engine=reader, read_sessions=sessionmaker(reader, expire_on_commit=False)
    )


def is_reachable(database: Database) -> bool:
    """True when a trivial query succeeds (the /ready probe)."""
    try:
        with database.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:  # any driver error means "not ready"
        return False
    return True


def redacted_url(url: str) -> str:
    """The URL with any password masked, for logs and CLI output."""
    return make_url(url).render_as_string(hide_password=True)


def alembic_config(url: str) -> Config:
    """Alembic configuration pointing at the packaged migrations and the given database."""
    cfg = Config()
    location = resources.files("fcp_server.storage") / "migrations"
    cfg.set_main_option("script_location", str(location))
    # Alembic's ini interpolation treats '%' specially; URLs may carry %-escapes.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_schema(url: str, revision: str = "head") -> None:
    """Applies Alembic migrations up to `revision` (what `fcp-server db upgrade` runs)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()
