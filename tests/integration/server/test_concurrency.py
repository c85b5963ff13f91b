"""Several processes check in, upload and aggregate at once against PostgreSQL."""

import multiprocessing

import pytest
from sqlalchemy import func, select

from fcp_server.app import create_app
from fcp_server.settings import ServerSettings
from fcp_server.storage.blobs import make_blob_store
from fcp_server.storage.models import Assignment, AssignmentStatus, Round, RoundStatus
from tests.fixtures.db import _truncate_all
from tests.integration.server import concurrent_devices, testkit

PROCESSES = 4


@pytest.mark.postgres
@pytest.mark.slow
def test_processes_never_over_assign_and_aggregate_exactly_the_goal(
    postgres_database_url, tmp_path
):
    _truncate_all(postgres_database_url)
    blob_dir = tmp_path / "shared-blobs"
    blob_dir.mkdir()
    blob_url = blob_dir.as_uri()
    settings = ServerSettings(
        database_url=postgres_database_url,
        embedded_worker=False,
        auto_migrate=False,
        log_format="text",
    )
    app = create_app(settings, blobs=make_blob_store(blob_url))
    api = testkit.Api(app.test_client())
    goal, capacity = 5, 8
    api.open_training(testkit.training_task(report_goal=goal, max_size=capacity, rounds=2))
    ctx = app.extensions["fcp"]
    spawn = multiprocessing.get_context("spawn")

    with spawn.Manager() as manager, spawn.Pool(PROCESSES) as pool:
        # Phase 1: 4 processes x 6 check-ins race for 8 slots.
        barrier = manager.Barrier(PROCESSES)
        results = pool.map(
            concurrent_devices.check_in_many,
            [(postgres_database_url, blob_url, 6, barrier)] * PROCESSES,
        )
        assigned = [a for chunk in results for a in chunk]
        assert len(assigned) == capacity  # never more, and no slot lost
        with ctx.database.sessions() as session:
            assert session.scalar(select(Round.active_count)) == capacity

        # Phase 2: all 8 holders report and upload at once; exactly `goal` are accepted.
        barrier = manager.Barrier(PROCESSES)
        chunks = [assigned[i::PROCESSES] for i in range(PROCESSES)]
        statuses = pool.map(
            concurrent_devices.report_and_upload,
            [(postgres_database_url, blob_url, c, barrier) for c in chunks],
        )
        flat = [s for chunk in statuses for s in chunk]
        assert flat.count(204) == goal
        assert all(s in (204, 409, -200) for s in flat), flat

        # Phase 3: several workers tick at once; exactly one aggregates the round.
        barrier = manager.Barrier(PROCESSES)
        closed = pool.map(
            concurrent_devices.tick, [(postgres_database_url, blob_url, barrier)] * PROCESSES
        )
        assert sum(closed) == 1

    with ctx.database.sessions() as session:
        first = session.scalar(select(Round).where(Round.iteration_id == 1))
        assert first.status == RoundStatus.COMPLETED
        assert (first.reported_count, first.aggregated_count) == (goal, goal)
        uploaded = session.scalar(
            select(func.count())
            .select_from(Assignment)
            .where(
                Assignment.round_pk == first.id,
                Assignment.status == AssignmentStatus.UPLOAD_COMPLETED,
            )
        )
        assert uploaded == goal
        second = session.scalar(select(Round).where(Round.iteration_id == 2))
        assert second.status == RoundStatus.COLLECTING
    ctx.database.dispose()
