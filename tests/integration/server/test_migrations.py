"""The Alembic migration produces exactly the schema the ORM models describe."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from fcp_server.storage import models


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
