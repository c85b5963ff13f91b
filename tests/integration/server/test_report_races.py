"""Report-result racing the worker or a duplicate report (found by the load test).

A COMPLETED report reads the assignment, then moves it ASSIGNED -> LOCAL_COMPLETED by
compare-and-swap. Between the two, the worker may time the device out or a retried report may
win. Those outcomes are final, so the device gets an answer (a rejection or the same upload
instruction), never a 409 asking it to retry something that cannot succeed.
"""

from fcp_server.protos import common_pb2, task_assignments_pb2
from fcp_server.services import reports
from fcp_server.storage import transitions
from fcp_server.storage.models import AssignmentStatus
from tests.integration.server import testkit
from tests.integration.server.testkit import POP

Result = task_assignments_pb2.ReportResultRequest


def _located_then_moved(api, ctx, clock, to: AssignmentStatus) -> reports.Located:
    """Reads the assignment as the report does, then lets another party move it first."""
    api.open_training(testkit.training_task(report_goal=2))
    a = api.assign().proto
    with ctx.database.sessions() as session, session.begin():
        located = reports.locate(
            session, POP, int(a.task_id), int(a.aggregation_id), a.assignment_id
        )
    with ctx.database.sessions() as session, session.begin():
        assert transitions.move_assignment(
            session, a.assignment_id, AssignmentStatus.ASSIGNED, to, now=clock.now()
        )
    assert located.assignment.status == AssignmentStatus.ASSIGNED  # the report's stale read
    return located


def _report(ctx, clock, located: reports.Located) -> reports.ReportOutcome:
    with ctx.database.sessions() as session, session.begin():
        return reports.report_result(
            session=session, located=located, result=Result.COMPLETED, now=clock.now()
        )


def test_a_report_that_loses_to_the_timeout_is_rejected(api, ctx, clock):
    located = _located_then_moved(api, ctx, clock, AssignmentStatus.LOCAL_TIMEOUT)

    outcome = _report(ctx, clock, located)

    assert not outcome.upload
    assert outcome.rejection is not None
    assert outcome.rejection.reason == common_pb2.RejectionReason.NO_TASK_AVAILABLE


def test_a_report_that_loses_to_its_own_retry_gets_the_same_upload_instruction(api, ctx, clock):
    located = _located_then_moved(api, ctx, clock, AssignmentStatus.LOCAL_COMPLETED)

    outcome = _report(ctx, clock, located)

    assert outcome.upload
    assert outcome.rejection is None
