"""Alembic environment: migrates the database given by the caller's connection or URL."""

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool

from fcp_server.storage import models

target_metadata = models.Base.metadata
config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # Alembic assumes SQLite has no transactional DDL and runs each statement on its own,
        # so two processes migrating a new database at once (gunicorn workers that each
        # auto-migrate) both read the old revision and one fails on a duplicate column. SQLite
        # does roll back DDL: one transaction (BEGIN IMMEDIATE, `storage.db`) serialises them,
        # and the later one finds the schema current.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; run db upgrade")
run_migrations_online()
