"""Every allowlisted metric, summed as state over devices and finalized by the server, equals
what Keras computes on the union of the devices' data (issue #5, "Metrics").

The per-device states come from the real TFLite device program the builder makes for a model
with that metric (run by the simulated device runtime), the sums and values from the server's
accumulator and finalizer. The tolerance is 1e-5 relative for every metric, AUC included: the
server finalizes the same 200-threshold confusion counts Keras' `AUC` keeps, so the only
difference left is float32 vs float64 arithmetic, not the thresholded approximation.
"""

import numpy as np
import pytest

from task_builder import metric_specs
from tests.integration.metrics_equivalence import cases

pytestmark = [pytest.mark.tf, pytest.mark.slow]

ALLOWLIST = sorted(metric_specs.ALLOWLIST)
RTOL = 1e-5


def _case(name: str) -> cases.ModelCase:
    case = cases.case_of(name)
    if case is None:
        pytest.fail(f"allowlisted metric {name!r} has no model case in cases.CASES")
    if name not in cases.KERAS_REFERENCE:
        pytest.fail(f"allowlisted metric {name!r} has no Keras reference")
    return case


def test_cases_name_only_allowlisted_metrics_each_once():
    named = [m for case in cases.CASES for m in case.metrics]
    assert sorted(named) == sorted(set(named))
    assert set(named) <= set(ALLOWLIST)
    assert set(cases.KERAS_REFERENCE) <= set(ALLOWLIST)


def test_clients_are_uneven_with_a_single_example_client_and_partial_batches():
    sizes = cases.CLIENT_SIZES
    assert 1 in sizes and len(set(sizes)) == len(sizes) >= 5
    assert any(s > cases.BATCH_SIZE and s % cases.BATCH_SIZE for s in sizes)


@pytest.mark.parametrize("name", ALLOWLIST)
def test_metric_finalized_from_summed_device_states_equals_keras_on_the_union(name, case_runs):
    # Arrange
    run = case_runs.get(_case(name))

    # Act: the devices reported and the server finalized while the case was run.
    got, expected = run.server[name], run.keras[name]

    # Assert
    assert [u.num_examples for u in run.updates] == list(cases.CLIENT_SIZES)
    assert np.isfinite(expected)
    assert got == pytest.approx(expected, rel=RTOL, abs=1e-7)


@pytest.mark.parametrize("case", cases.CASES, ids=[c.name for c in cases.CASES])
def test_loss_finalized_from_summed_device_states_equals_keras_on_the_union(case, case_runs):
    run = case_runs.get(case)
    assert run.server[metric_specs.LOSS_METRIC] == pytest.approx(
        run.keras[metric_specs.LOSS_METRIC], rel=RTOL
    )
    assert run.server["num_examples"] == sum(cases.CLIENT_SIZES)
