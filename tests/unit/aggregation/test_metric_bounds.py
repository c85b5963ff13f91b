"""Per-device metric bounds: a hostile state cannot push a finalized metric out of its range."""

import math

import numpy as np
import pytest

from fcp_server.aggregation import metrics
from fcp_server.protos import plan_pb2
from tests.unit.aggregation.hostile_metric_states import random_states, zig_zag_curves

Finalizer = plan_pb2.MetricSpec.Finalizer
ValueRange = plan_pb2.MetricSpec.ValueRange
# As many thresholds as Keras' AUC default (200): the more, the more a zig-zag adds up.
THRESHOLDS = np.linspace(0.0, 1.0, 200)
INF = math.inf


def _spec(finalizer: int, value_range: int = 0, max_state: float = 1.0) -> plan_pb2.MetricSpec:
    spec = plan_pb2.MetricSpec(name="m", max_state_per_example=max_state)
    spec.finalizer = finalizer  # type: ignore[assignment]
    spec.value_range = value_range  # type: ignore[assignment]
    if finalizer in (Finalizer.AUC_ROC, Finalizer.AUC_PR):
        spec.thresholds.extend(THRESHOLDS.tolist())
        for k in ("tp", "fp", "tn", "fn"):
            spec.state.add(name=k, shape=[THRESHOLDS.size], dtype="float32")
    elif finalizer == Finalizer.SUM:
        spec.state.add(name="sum", shape=[], dtype="float32")
    else:
        spec.state.add(name="a", shape=[], dtype="float32")
        spec.state.add(name="b", shape=[], dtype="float32")
    return spec


def _curve(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Keras' [tp, fp, tn, fn] over THRESHOLDS (prediction > threshold is positive)."""
    above = scores[None, :] > THRESHOLDS[:, None]
    pos = labels[None, :] == 1
    counts = [(above & pos), (above & ~pos), (~above & ~pos), (~above & pos)]
    return np.concatenate([c.sum(1) for c in counts]).astype(np.float64)


def _honest(finalizer: int, rng: np.random.Generator, n: int, level: float = 0.5) -> np.ndarray:
    """One honest device's state; a mean's per-example values are close to `level`."""
    labels = rng.integers(0, 2, n)
    scores = np.clip(0.4 * labels + rng.uniform(0.0, 0.7, n), 0.0, 1.0)
    if finalizer in (Finalizer.AUC_ROC, Finalizer.AUC_PR):
        return _curve(labels, scores)
    predicted = scores > 0.5
    if finalizer == Finalizer.PRECISION:
        return np.array([np.sum(predicted & (labels == 1)), np.sum(predicted & (labels == 0))])
    if finalizer == Finalizer.RECALL:
        return np.array([np.sum(predicted & (labels == 1)), np.sum(~predicted & (labels == 1))])
    if finalizer == Finalizer.SUM:
        return np.array([float(n)])
    values = np.clip(level + rng.uniform(-0.01, 0.01, n), 0.0, 1.0)
    return np.array([float(np.sum(values)), float(n)])


# (finalizer, value range) -> the values it can finalize to on real data.
RANGES = {
    (Finalizer.RATIO, ValueRange.VALUE_RANGE_UNSPECIFIED): (-INF, INF),
    (Finalizer.RATIO, ValueRange.NON_NEGATIVE): (0.0, INF),
    (Finalizer.RATIO, ValueRange.UNIT_INTERVAL): (0.0, 1.0),
    (Finalizer.SQRT_RATIO, ValueRange.NON_NEGATIVE): (0.0, INF),
    (Finalizer.PRECISION, ValueRange.VALUE_RANGE_UNSPECIFIED): (0.0, 1.0),
    (Finalizer.RECALL, ValueRange.VALUE_RANGE_UNSPECIFIED): (0.0, 1.0),
    (Finalizer.AUC_ROC, ValueRange.VALUE_RANGE_UNSPECIFIED): (0.0, 1.0),
    (Finalizer.AUC_PR, ValueRange.VALUE_RANGE_UNSPECIFIED): (0.0, 1.0),
    (Finalizer.SUM, ValueRange.VALUE_RANGE_UNSPECIFIED): (0.0, INF),
}


def test_every_finalizer_has_a_range_case():
    kinds = {f for f in Finalizer.values() if f != Finalizer.FINALIZER_UNSPECIFIED}
    assert kinds == {finalizer for finalizer, _ in RANGES}
    assert set(ValueRange.values()) == {r for f, r in RANGES if f == Finalizer.RATIO}, (
        "every value range needs a RATIO case"
    )


@pytest.mark.parametrize(("finalizer", "value_range"), sorted(RANGES))
def test_one_hostile_device_cannot_push_a_metric_out_of_its_range(finalizer, value_range):
    # Arrange: 10 honest devices of 5 examples (means near either end of [0, 1]), one hostile
    # device claiming 5.
    rng = np.random.default_rng(finalizer * 10 + value_range)
    spec = _spec(finalizer, value_range)
    low, high = RANGES[(finalizer, value_range)]
    size = metrics.state_size(spec)
    crafted = [*zig_zag_curves(THRESHOLDS.size, 5.0)] if size == 4 * THRESHOLDS.size else []
    for level in (0.01, 0.99):
        honest = np.sum([_honest(finalizer, rng, 5, level) for _ in range(10)], axis=0)
        for hostile in [*random_states(rng, size, 200), *crafted]:
            # Act
            value = metrics.finalize_metric(spec, honest + metrics.clamp_state(spec, hostile, 5))

            # Assert
            assert low - 1e-12 <= value <= high + 1e-12, hostile


@pytest.mark.parametrize(
    ("finalizer", "value_range", "count_share"),
    [
        (Finalizer.RATIO, ValueRange.UNIT_INTERVAL, 1),
        (Finalizer.PRECISION, ValueRange.VALUE_RANGE_UNSPECIFIED, 2),
        (Finalizer.RECALL, ValueRange.VALUE_RANGE_UNSPECIFIED, 2),
    ],
)
def test_a_hostile_device_moves_a_bounded_mean_by_at_most_its_share(
    finalizer, value_range, count_share
):
    # A ratio of sums: the hostile device adds at most `bound` to the numerator and
    # count_share x bound to the denominator (precision's tp + fp, recall's tp + fn).
    rng = np.random.default_rng(11)
    spec = _spec(finalizer, value_range)
    honest = np.sum([_honest(finalizer, rng, 5) for _ in range(40)], axis=0)
    honest_value = metrics.finalize_metric(spec, honest)
    denominator = honest[1] if finalizer == Finalizer.RATIO else honest[0] + honest[1]
    bound = count_share * 5.0
    extremes = np.array([[1e9, 0.0], [-1e9, 0.0], [0.0, 1e9], [1e9, 1e9]])
    for hostile in [*rng.uniform(-1e3, 1e3, (200, 2)), *extremes]:
        value = metrics.finalize_metric(spec, honest + metrics.clamp_state(spec, hostile, 5))
        assert abs(value - honest_value) <= bound / (denominator + bound) + 1e-12, hostile


def test_ratio_numerators_follow_the_value_range():
    state = np.array([-7.0, 4.0])
    signed = _spec(Finalizer.RATIO, ValueRange.VALUE_RANGE_UNSPECIFIED, max_state=0.0)
    np.testing.assert_array_equal(metrics.clamp_state(signed, state, 2), [-7.0, 4.0])
    non_negative = _spec(Finalizer.RATIO, ValueRange.NON_NEGATIVE, max_state=0.0)
    np.testing.assert_array_equal(metrics.clamp_state(non_negative, state, 2), [0.0, 4.0])
    unit = _spec(Finalizer.RATIO, ValueRange.UNIT_INTERVAL)
    # More correct predictions than predictions: capped at the (bounded) count.
    np.testing.assert_array_equal(metrics.clamp_state(unit, np.array([9.0, 4.0]), 5), [4.0, 4.0])
    np.testing.assert_array_equal(metrics.clamp_state(unit, np.array([3.0, 9.0]), 5), [3.0, 5.0])
    np.testing.assert_array_equal(metrics.clamp_state(unit, state, 5), [0.0, 4.0])


def test_real_confusion_curves_are_left_unchanged():
    rng = np.random.default_rng(4)
    spec = _spec(Finalizer.AUC_ROC)
    for n in (1, 2, 7, 30):
        curve = _honest(Finalizer.AUC_ROC, rng, n)
        np.testing.assert_array_equal(metrics.clamp_state(spec, curve, n), curve)


def test_a_zig_zag_curve_is_projected_onto_a_real_one():
    spec = _spec(Finalizer.AUC_ROC)
    t = THRESHOLDS.size
    zig = (np.arange(t) % 2 == 0).astype(float) * 3.0
    state = np.concatenate([zig, 3.0 - zig, zig, 3.0 - zig])
    tp, fp, tn, fn = metrics.clamp_state(spec, state, 3).reshape(4, -1)
    assert np.all(np.diff(tp) <= 0) and np.all(np.diff(fp) <= 0)
    assert len(set(tp + fn)) == 1 and len(set(fp + tn)) == 1
    assert tp[0] + fn[0] <= 3 and fp[0] + tn[0] <= 3
