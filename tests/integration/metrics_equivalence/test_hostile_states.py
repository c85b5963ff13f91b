"""A hostile device cannot push any allowlisted metric outside its range (issue #5, #9 item 4).

Metric state is not privatised, so the server bounds each device's state before summing it
(`fcp_server.aggregation.metrics.clamp_state`). Here the honest devices of each model case
report through the real device program, and one more device reports an arbitrary state for the
metric under test: random magnitudes and signs, extremes, and curves crafted against the
finalizer (a non-monotone AUC curve, a numerator without a count). The finalized value must
stay in the metric's range, and a mean (ratio of sums) may move by at most the hostile device's
bounded share of the total count.
"""

import math
from collections.abc import Iterator

import numpy as np
import pytest

from fcp_server.aggregation import metrics
from fcp_server.aggregation.state import ClientUpdate
from fcp_server.protos import plan_pb2
from task_builder import metric_specs
from tests.integration.metrics_equivalence import cases, pipeline
from tests.unit.aggregation.hostile_metric_states import random_states, zig_zag_curves

pytestmark = [pytest.mark.tf, pytest.mark.slow]

Finalizer = plan_pb2.MetricSpec.Finalizer
INF = math.inf
UNIT = (0.0, 1.0)
NON_NEGATIVE = (0.0, INF)
ANY = (-INF, INF)
# The values each metric can take on any data, written out independently of the builder.
RANGES: dict[str, tuple[float, float]] = {
    "auc-roc": UNIT,
    "auc-pr": UNIT,
    "accuracy": UNIT,
    "binary_accuracy": UNIT,
    "binary_crossentropy": NON_NEGATIVE,
    "binary_crossentropy_from_logits": NON_NEGATIVE,
    "categorical_accuracy": UNIT,
    "categorical_crossentropy": NON_NEGATIVE,
    "categorical_crossentropy_from_logits": NON_NEGATIVE,
    "mean": ANY,
    "mean_absolute_error": NON_NEGATIVE,
    "mean_absolute_percentage_error": NON_NEGATIVE,
    "mean_squared_error": NON_NEGATIVE,
    "mean_squared_logarithmic_error": NON_NEGATIVE,
    "precision": UNIT,
    "recall": UNIT,
    "root_mean_squared_error": NON_NEGATIVE,
    "sparse_categorical_accuracy": UNIT,
    "sparse_categorical_crossentropy": NON_NEGATIVE,
    "sparse_categorical_crossentropy_from_logits": NON_NEGATIVE,
    # A model's own loss may be any sign (custom losses).
    metric_specs.LOSS_METRIC: ANY,
}
HOSTILE_EXAMPLES = 3
NUM_RANDOM = 60


def hostile_states(spec: plan_pb2.MetricSpec, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Flattened states a hostile device may upload for this metric."""
    size = metrics.state_size(spec)
    for big in (1.0, float(HOSTILE_EXAMPLES), 1e6, 3e38):
        yield np.full(size, big)
        yield np.full(size, -big)
        if size == 2:
            yield np.array([big, 0.0])
            yield np.array([-big, 0.0])
            yield np.array([0.0, big])
            yield np.array([big, 1e-6])
            yield np.array([-big, 1e-6])
        if spec.finalizer in (Finalizer.AUC_ROC, Finalizer.AUC_PR):
            yield from zig_zag_curves(len(spec.thresholds), big)
    yield from random_states(rng, size, NUM_RANDOM)


def _with_hostile(
    updates: list[ClientUpdate], spec: plan_pb2.MetricSpec, state: np.ndarray
) -> list[ClientUpdate]:
    tensors, offset = [], 0
    for tensor in spec.state:
        n = math.prod(tensor.shape)
        tensors.append(state[offset : offset + n].reshape(tuple(tensor.shape)).astype(np.float32))
        offset += n
    template = updates[0]
    hostile_metrics = dict(template.metrics)
    hostile_metrics[spec.name] = tuple(tensors)
    return [*updates, ClientUpdate(template.trainable, HOSTILE_EXAMPLES, hostile_metrics)]


def _count_share(spec: plan_pb2.MetricSpec, honest: np.ndarray) -> float | None:
    """Most a ratio-of-sums metric may move: the hostile device's bounded count share."""
    if spec.max_state_per_example <= 0.0:
        return None
    bound = spec.max_state_per_example * HOSTILE_EXAMPLES
    if spec.finalizer == Finalizer.RATIO:
        count, hostile = honest[1], bound
    elif spec.finalizer in (Finalizer.PRECISION, Finalizer.RECALL):
        count, hostile = honest[0] + honest[1], 2 * bound
    else:
        return None
    return hostile / (count + hostile)


@pytest.mark.parametrize("name", [*sorted(metric_specs.ALLOWLIST), metric_specs.LOSS_METRIC])
def test_hostile_metric_state_stays_in_range_and_within_one_share(name, case_runs):
    # Arrange
    if name not in RANGES:
        pytest.fail(f"allowlisted metric {name!r} has no range in RANGES")
    low, high = RANGES[name]
    case = cases.CASES[0] if name == metric_specs.LOSS_METRIC else cases.case_of(name)
    if case is None:
        pytest.fail(f"allowlisted metric {name!r} has no model case in cases.CASES")
    run = case_runs.get(case)
    spec = next(m for m in run.built.task.server_plan.metrics if m.name == name)
    honest_state = np.sum(
        [metrics.flatten_state(u.metrics[name]) for u in run.updates], axis=0, dtype=np.float64
    )
    honest_value = run.server[name]
    share = _count_share(spec, honest_state)
    rng = np.random.default_rng(sum(map(ord, name)))

    for state in hostile_states(spec, rng):
        # Act
        value = pipeline.server_metrics(run.built, _with_hostile(run.updates, spec, state))[name]

        # Assert
        assert np.isfinite(value), state
        assert low - 1e-9 <= value <= high + 1e-9, (value, state)
        if share is not None:
            assert abs(value - honest_value) <= share * (high - low) + 1e-9, (value, state)
