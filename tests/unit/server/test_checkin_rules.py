import collections

import numpy as np
import pytest

from fcp_server import errors
from fcp_server.services import checkin


def test_zero_weights_are_never_drawn():
    rng = np.random.default_rng(0)
    draws = [checkin.draw_weighted([0, 3, 0, 1], rng) for _ in range(2000)]
    counts = collections.Counter(draws)
    assert set(counts) == {1, 3}
    assert counts[1] / len(draws) == pytest.approx(0.75, abs=0.04)


def test_zero_weight_after_a_nonzero_does_not_steal_traffic():
    # The reference's TreeMap bug: a zero weight after a non-zero one took all traffic.
    rng = np.random.default_rng(1)
    assert {checkin.draw_weighted([5, 0], rng) for _ in range(200)} == {0}


def test_all_zero_weights_draw_nothing_and_negative_weights_are_refused():
    rng = np.random.default_rng(2)
    assert checkin.draw_weighted([0, 0], rng) is None
    assert checkin.draw_weighted([], rng) is None
    with pytest.raises(ValueError, match="traffic weights"):
        checkin.draw_weighted([1, -1], rng)


def test_rejections_follow_the_reference_table():
    full = checkin.rejection(checkin.Rating.ITERATION_FULL)
    assert full.retry_seconds == (60, 300)
    mismatch = checkin.rejection(checkin.Rating.CLIENT_VERSION_MISMATCH)
    assert mismatch.retry_seconds == (86400, 172800)
    assert (
        checkin.rejection(checkin.Rating.ITERATION_NOT_ACTIVE).reason
        == checkin.common_pb2.RejectionReason.NO_ACTIVE_TASK_EXISTS
    )


def test_versions_are_compared_numerically():
    assert checkin.version_in_range(341912000, "341812000", "999999999")
    assert not checkin.version_in_range(99, "100", "")
    assert checkin.version_in_range(10, "9", "")  # "10" < "9" as strings, not as numbers
    for bad in ("", "1.0", "-1", "v1", "1" * 19):
        with pytest.raises(errors.BadRequest):
            checkin.parse_client_version(bad)
