"""The Alembic migration produces exactly the schema the ORM models describe."""

import multiprocessing
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, event, inspect

from fcp_server.storage import db, models


def test_migrated_schema_matches_models(database):
    with database.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, models.Base.metadata)
    assert diff == []


def test_migration_creates_every_table_and_the_active_task_index(database):
    inspector = inspect(database.engine)
    tables = set(inspector.get_table_names())
    assert {t.name for t in models.Base.metadata.sorted_tables} <= tables
    assert "alembic_version" in tables
    indexes = {ix["name"]: ix for ix in inspector.get_indexes("tasks")}
    assert indexes["uq_tasks_one_active_per_kind"]["unique"]


def _upgrade(url: str, barrier: Any) -> str | None:
    barrier.wait()  # every process starts migrating the new database at once
    try:
        db.upgrade_schema(url)
    except Exception as e:  # reported to the test, which names it
        return repr(e)
    return None


def test_processes_migrating_a_new_sqlite_database_at_once_all_succeed(tmp_path):
    # gunicorn workers that each auto-migrate do this at start-up; run without one
    # transaction for the whole upgrade, about one database in four failed with a duplicate
    # column (both processes had read the old revision).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(4) as pool:
        for i in range(3):
            url = f"sqlite:///{tmp_path / f'new{i}.db'}"
            errors = pool.starmap(_upgrade, [(url, manager.Barrier(4))] * 4)
            assert errors == [None] * 4
            with db.connect(url).engine.connect() as conn:
                assert MigrationContext.configure(conn).get_current_heads()


def test_an_sqlite_upgrade_is_one_transaction(tmp_path):
    commits = []

    def count(conn: Any) -> None:
        commits.append(conn)

    event.listen(Engine, "commit", count)
    try:
        db.upgrade_schema(f"sqlite:///{tmp_path / 'new.db'}")
    finally:
        event.remove(Engine, "commit", count)
    assert len(commits) == 1
