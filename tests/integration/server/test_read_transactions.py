"""On SQLite the upload, the round close and the worker's look-ahead read outside the queue.

Each write transaction on SQLite begins with BEGIN IMMEDIATE inside the writers' queue
(`storage.db`); the reads these paths make take `Database.reads`. Counted here: the
transactions begun on the writers' engine while the path runs.
"""

import contextlib

import pytest
from sqlalchemy import event

from fcp_server.services import round_close
from tests.integration.server import testkit


@pytest.fixture
def sqlite_only(db_url):
    if not db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL has no writers' queue: reads and writes share one pool")


@contextlib.contextmanager
def _writes_begun(ctx):
    begun: list[int] = []

    def count(_conn):
        begun.append(1)

    event.listen(ctx.database.engine, "begin", count)
    try:
        yield begun
    finally:
        event.remove(ctx.database.engine, "begin", count)


def test_an_upload_queues_once_to_commit(sqlite_only, api, ctx):
    # Arrange
    api.open_training(testkit.training_task(report_goal=2, max_size=3))
    a = api.assign()
    _, answer = api.report(a)
    # Act
    with _writes_begun(ctx) as begun:
        resp = api.upload(answer.upload_instruction.upload_location, testkit.update_bytes())
    # Assert: the assignment's and round's checks read outside the queue
    assert resp.status_code == 204
    assert len(begun) == 1


def test_a_round_close_queues_only_to_claim_and_commit(sqlite_only, api, ctx, worker):
    # Arrange
    api.open_training(testkit.training_task(report_goal=1, max_size=2, rounds=2))
    api.contribute()
    # Act
    with _writes_begun(ctx) as begun:
        pending = round_close.aggregating_rounds(worker._deps)
        closed = round_close.close_round(worker._deps, pending[0])
        worker.accounting.look_ahead(worker._deps)
    # Assert: the poll, the update list, both claim checks and the look-ahead read
    assert closed is True
    assert len(begun) == 2
