from collections.abc import Sequence

import numpy as np
import pytest

from fcp_server.aggregation import metrics
from fcp_server.aggregation.state import Tensor
from fcp_server.protos import plan_pb2

Finalizer = plan_pb2.MetricSpec.Finalizer


def _spec(
    finalizer: int,
    sizes: Sequence[int | None],
    *,
    thresholds: Sequence[float] = (),
    max_state: float = 0.0,
    name: str = "m",
) -> plan_pb2.MetricSpec:
    spec = plan_pb2.MetricSpec(name=name, max_state_per_example=max_state)
    spec.finalizer = finalizer  # type: ignore[assignment]
    for size in sizes:
        spec.state.add(shape=[size] if size is not None else [], dtype="float32")
    spec.thresholds.extend(thresholds)
    return spec


def test_divide_no_nan_returns_zero_for_zero_denominators():
    np.testing.assert_array_equal(
        metrics.divide_no_nan(np.array([1.0, 0.0, 3.0]), np.array([2.0, 0.0, 0.0])),
        [0.5, 0.0, 0.0],
    )


@pytest.mark.parametrize(
    ("finalizer", "state", "expected"),
    [
        (Finalizer.RATIO, [3.0, 4.0], 0.75),
        (Finalizer.RATIO, [0.0, 0.0], 0.0),
        (Finalizer.SQRT_RATIO, [8.0, 2.0], 2.0),
        (Finalizer.PRECISION, [3.0, 1.0], 0.75),
        (Finalizer.RECALL, [1.0, 3.0], 0.25),
        (Finalizer.PRECISION, [0.0, 0.0], 0.0),
        (Finalizer.SUM, [42.0], 42.0),
    ],
)
def test_scalar_finalizers(finalizer, state, expected):
    spec = _spec(finalizer, [None] * len(state))
    value = metrics.finalize_metric(spec, np.array(state))
    assert value == pytest.approx(expected)


def test_state_tensors_are_read_flattened_in_order():
    spec = _spec(Finalizer.RATIO, [2])
    state = metrics.flatten_state([np.array([6.0, 3.0], np.float32)])
    assert metrics.finalize_metric(spec, state) == pytest.approx(2.0)


def test_perfect_and_random_classifiers_auc():
    spec = _spec(Finalizer.AUC_ROC, [3] * 4, thresholds=[0.0, 0.5, 1.0])
    # At threshold 0.5 all positives are above and all negatives below.
    tp, fp, tn, fn = [5, 5, 0], [5, 0, 0], [0, 5, 5], [0, 0, 5]
    assert metrics.finalize_metric(spec, np.array([*tp, *fp, *tn, *fn], float)) == 1.0
    pr = _spec(Finalizer.AUC_PR, [3] * 4, thresholds=[0.0, 0.5, 1.0])
    assert metrics.finalize_metric(pr, np.array([*tp, *fp, *tn, *fn], float)) == pytest.approx(1.0)
    tp, fp, tn, fn = [5, 0, 0], [5, 0, 0], [0, 5, 5], [0, 5, 5]
    assert metrics.finalize_metric(spec, np.array([*tp, *fp, *tn, *fn], float)) == 0.5


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (_spec(Finalizer.RATIO, [None]), "needs 2 state elements"),
        (_spec(Finalizer.SUM, [2]), "needs 1 state elements"),
        (_spec(Finalizer.AUC_ROC, [3] * 4, thresholds=[0.1, 0.9]), "tp, fp, tn, fn"),
        (_spec(Finalizer.AUC_PR, [1] * 4), "tp, fp, tn, fn"),
        (_spec(Finalizer.FINALIZER_UNSPECIFIED, [None]), "unknown finalizer"),
        (_spec(Finalizer.SUM, [None], max_state=-1.0), "max_state_per_example"),
    ],
)
def test_invalid_specs_are_rejected_with_the_metric_name(spec, match):
    with pytest.raises(ValueError, match=match):
        metrics.validate_metric_spec(spec)


def test_finalize_rejects_a_state_of_the_wrong_size():
    with pytest.raises(ValueError, match="3 elements, expected 2"):
        metrics.finalize_metric(_spec(Finalizer.RATIO, [None, None]), np.zeros(3))


def test_clamp_state_bounds_by_examples_and_keeps_ratio_numerators_signed():
    ratio = _spec(Finalizer.RATIO, [None, None], max_state=2.0)
    np.testing.assert_array_equal(
        metrics.clamp_state(ratio, np.array([-100.0, 100.0]), 5), [-10.0, 10.0]
    )
    counts = _spec(Finalizer.PRECISION, [None, None], max_state=1.0)
    np.testing.assert_array_equal(metrics.clamp_state(counts, np.array([-1.0, 7.0]), 5), [0, 5])
    unbounded = _spec(Finalizer.SUM, [None])
    np.testing.assert_array_equal(metrics.clamp_state(unbounded, np.array([1e5]), 1), [1e5])


def test_clamp_state_caps_every_metric_at_the_per_device_ceiling():
    # No per-example bound (losses) or a huge claimed num_examples: the ceiling still holds.
    ceiling = metrics.MAX_STATE_PER_DEVICE
    unbounded = _spec(Finalizer.SUM, [None])
    np.testing.assert_array_equal(metrics.clamp_state(unbounded, np.array([1e12]), 1), [ceiling])
    loss = _spec(Finalizer.RATIO, [None, None])
    np.testing.assert_array_equal(
        metrics.clamp_state(loss, np.array([-3e38, 3e38]), 10), [-ceiling, ceiling]
    )
    counts = _spec(Finalizer.RECALL, [None, None], max_state=1.0)
    np.testing.assert_array_equal(
        metrics.clamp_state(counts, np.array([1e9, 1e9]), 10_000_000), [ceiling, ceiling]
    )
    assert metrics.bounded_examples(10_000_000) == int(ceiling)
    assert metrics.bounded_examples(-5) == 0


# --- Equivalence with Keras (the metrics devices compute state for) ---------------------


def _devices(
    rng: np.random.Generator, n_devices: int = 3, per_device: int = 40
) -> tuple[list[Tensor], list[Tensor]]:
    labels = [rng.integers(0, 2, size=per_device).astype(np.float32) for _ in range(n_devices)]
    preds = [
        np.clip(0.6 * y + rng.normal(0.2, 0.3, size=per_device), 0, 1).astype(np.float32)
        for y in labels
    ]
    return labels, preds


def _confusion(y: Tensor, p: Tensor, thresholds: Sequence[float]) -> Tensor:
    above = p[None, :] > np.asarray(thresholds, np.float32)[:, None]
    pos = y[None, :] == 1
    confusion: Tensor = np.stack(
        [(above & pos).sum(1), (above & ~pos).sum(1), (~above & ~pos).sum(1), (~above & pos).sum(1)]
    ).astype(np.float64)
    return confusion


@pytest.mark.tf
@pytest.mark.parametrize(
    ("curve", "finalizer"), [("ROC", Finalizer.AUC_ROC), ("PR", Finalizer.AUC_PR)]
)
def test_auc_equals_keras(curve, finalizer):
    tf = pytest.importorskip("tensorflow")
    labels, preds = _devices(np.random.default_rng(0))
    keras_auc = tf.keras.metrics.AUC(num_thresholds=20, curve=curve)
    for y, p in zip(labels, preds, strict=True):
        keras_auc.update_state(y, p)
    thresholds = keras_auc.thresholds
    # Devices report [tp, fp, tn, fn]; the server sums them.
    total = np.sum([_confusion(y, p, thresholds) for y, p in zip(labels, preds, strict=True)], 0)
    np.testing.assert_array_equal(total[0], keras_auc.true_positives.numpy())
    spec = _spec(finalizer, [len(thresholds)] * 4, thresholds=thresholds)
    value = metrics.finalize_metric(spec, total.ravel())
    assert value == pytest.approx(float(keras_auc.result()), rel=1e-5)


@pytest.mark.tf
def test_precision_recall_equal_keras():
    tf = pytest.importorskip("tensorflow")
    labels, preds = _devices(np.random.default_rng(1))
    precision, recall = tf.keras.metrics.Precision(), tf.keras.metrics.Recall()
    tp = fp = fn = 0.0
    for y, p in zip(labels, preds, strict=True):
        precision.update_state(y, p)
        recall.update_state(y, p)
        c = _confusion(y, p, [0.5])[:, 0]
        tp, fp, fn = tp + c[0], fp + c[1], fn + c[3]
    spec_p = _spec(Finalizer.PRECISION, [None, None])
    spec_r = _spec(Finalizer.RECALL, [None, None])
    assert metrics.finalize_metric(spec_p, np.array([tp, fp])) == pytest.approx(
        float(precision.result()), rel=1e-6
    )
    assert metrics.finalize_metric(spec_r, np.array([tp, fn])) == pytest.approx(
        float(recall.result()), rel=1e-6
    )


@pytest.mark.tf
def test_mean_metrics_equal_keras():
    tf = pytest.importorskip("tensorflow")
    labels, preds = _devices(np.random.default_rng(2))
    mse, rmse = tf.keras.metrics.MeanSquaredError(), tf.keras.metrics.RootMeanSquaredError()
    accuracy = tf.keras.metrics.BinaryAccuracy()
    sq = acc = count = 0.0
    for y, p in zip(labels, preds, strict=True):
        for metric in (mse, rmse, accuracy):
            metric.update_state(y, p)
        sq += float(np.sum((y.astype(np.float64) - p) ** 2))
        acc += float(np.sum((p > 0.5) == (y == 1)))
        count += y.size
    assert metrics.finalize_metric(
        _spec(Finalizer.RATIO, [None, None]), np.array([sq, count])
    ) == pytest.approx(float(mse.result()), rel=1e-5)
    assert metrics.finalize_metric(
        _spec(Finalizer.SQRT_RATIO, [None, None]), np.array([sq, count])
    ) == pytest.approx(float(rmse.result()), rel=1e-5)
    assert metrics.finalize_metric(
        _spec(Finalizer.RATIO, [None, None]), np.array([acc, count])
    ) == pytest.approx(float(accuracy.result()), rel=1e-6)
