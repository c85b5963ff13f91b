import datetime as dt

import pytest

from fcp_server.protos import task_pb2
from fcp_server.services import eval_selection as sel


@pytest.mark.parametrize(
    ("latest", "every", "first"),
    [(0, 2, None), (1, 2, 1), (2, 2, 1), (3, 2, 3), (4, 2, 3), (5, 1, 5), (6, 3, 4), (7, 3, 7)],
)
def test_round_buckets_follow_the_reference(latest, every, first):
    # ODP groups result r into floor((r - 1) / k) and keeps each bucket's first result.
    assert sel.first_of_newest_round_bucket(latest, every) == first


def test_hour_buckets_are_aligned_to_the_epoch():
    t = dt.datetime(2025, 3, 4, 17, 59, 59, tzinfo=dt.UTC)
    assert sel.bucket_start(t, 1) == dt.datetime(2025, 3, 4, 17, tzinfo=dt.UTC)
    assert sel.bucket_start(t, 6) == dt.datetime(2025, 3, 4, 12, tzinfo=dt.UTC)
    assert sel.bucket_start(t, 24) == dt.datetime(2025, 3, 4, tzinfo=dt.UTC)
    later = dt.datetime(2025, 3, 4, 18, tzinfo=dt.UTC)
    assert sel.bucket_start(later, 1) == later


def test_selector_from_task_info():
    info = task_pb2.TaskInfo()
    info.evaluation_info.SetInParent()
    assert sel.selector_from_info(info) == sel.CheckpointSelector(rounds=1)  # builder default
    info.evaluation_info.check_point_selector.iteration_selector.size = 4
    assert sel.selector_from_info(info) == sel.CheckpointSelector(rounds=4)
    info.evaluation_info.check_point_selector.duration_selector.hours = 12
    assert sel.selector_from_info(info) == sel.CheckpointSelector(hours=12)


@pytest.mark.parametrize(
    ("rounds", "hours", "message"),
    [
        (-1, 0, "iteration_selector.size"),
        (0, -2, "duration_selector.hours"),
        (0, sel.MAX_SELECTOR_HOURS + 1, "duration_selector.hours"),
        (2, 3, "exactly one"),
        (0, 0, "exactly one"),
    ],
)
def test_invalid_selectors_are_refused(rounds, hours, message):
    with pytest.raises(ValueError, match=message):
        sel.CheckpointSelector(rounds=rounds, hours=hours)
