"""The worker's timeout sweep racing a device upload on PostgreSQL row locks.

An upload locks its assignment, then its round (to count the report). The sweep used to lock
each expired assignment and then its round, assignment after assignment, in one transaction:
holding the round after the first timeout while waiting for an assignment an upload held, and
that upload waiting for the round, is a lock cycle PostgreSQL breaks by killing one of them
("deadlock detected": a 500 for the device, or a failed tick). The sweep now takes every
assignment lock first and the round locks last, the order uploads and reports use.
SQLite serialises writers (BEGIN IMMEDIATE), so only PostgreSQL can interleave them.
"""

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from fcp_server.services import maintenance
from fcp_server.storage import transitions
from fcp_server.storage.models import Assignment, AssignmentStatus, Round
from tests.integration.server import testkit
from tests.integration.server.row_locks import while_blocked


def test_timeout_sweep_and_upload_of_the_same_round_do_not_deadlock(api, ctx, clock):
    if ctx.database.engine.dialect.name != "postgresql":
        pytest.skip("needs row locks: SQLite serialises writers")
    api.open_training(testkit.training_task(report_goal=3, max_size=4))
    silent = api.assign().proto  # never reports: the sweep times it out
    uploader = api.assign()
    assert api.report(uploader)[0].status_code == 200  # LOCAL_COMPLETED
    settings = ctx.settings
    clock.advance(max(settings.local_compute_timeout_seconds, settings.upload_timeout_seconds) + 1)
    with ctx.database.sessions() as session:
        round_pk = session.scalar(select(Round.id))

    # The upload's transaction: the assignment is moved (and locked) first...
    upload = ctx.database.sessions()
    upload.begin()
    assert transitions.move_assignment(
        upload,
        uploader.proto.assignment_id,
        AssignmentStatus.LOCAL_COMPLETED,
        AssignmentStatus.UPLOAD_COMPLETED,
        now=clock.now(),
    )

    # ... while the sweep times out the silent device and then reaches the uploader's row.
    def sweep(session: Session) -> None:
        maintenance.expire_assignments(session, now=clock.now(), settings=ctx.settings)

    with while_blocked(ctx, upload, sweep, "the timeout sweep") as failures:
        # The upload now counts its report on the round and commits.
        assert transitions.count_report(upload, round_pk)
        upload.commit()

    assert failures == []
    with ctx.database.sessions() as session:
        statuses = dict(session.execute(select(Assignment.id, Assignment.status)).tuples().all())
        rnd = session.get(Round, round_pk)
    assert statuses[silent.assignment_id] == AssignmentStatus.LOCAL_TIMEOUT
    assert statuses[uploader.proto.assignment_id] == AssignmentStatus.UPLOAD_COMPLETED
    assert (rnd.active_count, rnd.reported_count) == (1, 1)
