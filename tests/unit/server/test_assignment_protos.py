"""The TaskAssignment built at check-in: its report deadline is protobuf's own conversion."""

import datetime as dt

import pytest
from google.protobuf import timestamp_pb2

from fcp_server.protos import task_assignments_pb2
from fcp_server.services.assignment_protos import fill_task_assignment
from fcp_server.services.checkin import Assigned
from fcp_server.services.round_slots import OpenRound

ROUND = OpenRound(
    round_pk=7,
    status="COLLECTING",
    capacity=10,
    active_count=0,
    iteration_id=3,
    base_result_id=2,
    client_checkpoint_sha256="c" * 64,
    population_name="pop",
    task_id=5,
    min_client_version="",
    max_client_version="",
    traffic_weight=1,
    client_plan_sha256="p" * 64,
    info_json="{}",
)
PLUS_TWO = dt.timezone(dt.timedelta(hours=2))


@pytest.mark.parametrize(
    "created",
    [
        dt.datetime(2026, 12, 6, 22, 59, 59, 999_999, tzinfo=dt.UTC),
        dt.datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=PLUS_TWO),  # the day before in UTC
        dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
        dt.datetime(1969, 12, 31, 23, 59, 0, 250_000, tzinfo=dt.UTC),  # before the epoch
        dt.datetime(2100, 2, 28, 23, 0, 30, 123_456, tzinfo=dt.timezone(-dt.timedelta(hours=5))),
    ],
)
@pytest.mark.parametrize("timeout", [0, 1, 900, 86_400 * 3 + 7])
def test_report_deadline_matches_protobufs_conversion(created, timeout):
    proto = task_assignments_pb2.TaskAssignment(assignment_id="stale", task_name="stale")
    assigned = Assigned(assignment_id="a-1", created_at=created, round=ROUND)

    fill_task_assignment(proto, assigned, gzip=True, local_timeout=timeout)

    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(created + dt.timedelta(seconds=timeout))
    assert (proto.report_deadline.seconds, proto.report_deadline.nanos) == (
        expected.seconds,
        expected.nanos,
    )
    assert proto.assignment_id == "a-1"
    assert proto.task_name == "/population/pop/task/5"  # the round's part replaced the stale one
    assert proto.self_uri == "/population/pop/task/5/aggregation/3/task-assignment/a-1"


def test_a_naive_creation_time_is_refused():
    assigned = Assigned(assignment_id="a-1", created_at=dt.datetime(2026, 1, 1), round=ROUND)
    with pytest.raises(TypeError):
        fill_task_assignment(
            task_assignments_pb2.TaskAssignment(), assigned, gzip=False, local_timeout=60
        )
