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


def test_the_generator_is_made_only_when_there_is_a_choice():
    made, rng = [], np.random.default_rng(3)

    def factory():
        made.append(1)
        return rng

    assert checkin.draw_weighted([0, 7, 0], factory) == 1
    assert made == []
    draws = {checkin.draw_weighted([0, 7, 0, 2], factory) for _ in range(200)}
    assert draws == {1, 3}
    assert len(made) == 200


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


def _reference_eval_weight(evaluation_traffic: float) -> int:
    # ODP task builder (reference 1.11): next to training's weight 100.
    if evaluation_traffic == 1.0:
        return 10_000
    return int(evaluation_traffic * 100 / (1 - evaluation_traffic))


@pytest.mark.parametrize(
    ("evaluation_traffic", "expected_share"),
    [(0.2, 0.2), (0.5, 0.5), (0.05, 5 / 105), (1.0, 10_000 / 10_100), (0.0, 0.0)],
)
def test_eval_share_of_check_ins_follows_evaluation_traffic(evaluation_traffic, expected_share):
    # Arrange: a training round (weight 100) and an eval round, as the check-in sees them.
    rng = np.random.default_rng(3)
    weights = [100, _reference_eval_weight(evaluation_traffic)]

    # Act
    draws = np.array([checkin.draw_weighted(weights, rng) for _ in range(100_000)])

    # Assert: P(eval) = w / (100 + w) = evaluation_traffic (binomial sd <= 0.0016).
    assert np.mean(draws == 1) == pytest.approx(expected_share, abs=0.006)
    assert abs(expected_share - evaluation_traffic) < 0.011  # int() truncation of the weight
