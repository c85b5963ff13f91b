"""The queries read the accumulator's float32 sum as it is: the same bits as a float64 copy."""

import numpy as np
import pytest

from fcp_server.aggregation import gaussian_noise
from fcp_server.aggregation.accumulator import RoundAccumulator
from fcp_server.aggregation.state import ClientUpdate
from fcp_server.protos import plan_pb2
from tests.unit.aggregation.dp_rounds import ALL_DP_TYPES, noisy_plan
from tests.unit.aggregation.plan_builders import DpType, make_update

# Several noise blocks in one tensor, and a small one.
SHAPES = [(2 * gaussian_noise._NOISE_BLOCK + 3,), (5,)]


def _plan(dp_type: DpType) -> plan_pb2.ServerPlan:
    return noisy_plan(dp_type, SHAPES, clients_per_round=4)


def _updates() -> list[ClientUpdate]:
    rng = np.random.default_rng(0)
    return [
        make_update(
            tuple((rng.normal(size=s) * 1e-3).astype(np.float32) for s in SHAPES),
            with_metrics=False,
        )
        for _ in range(3)
    ]


def _assert_same_bits(a: object, b: object) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same_bits(a[key], b[key])
    elif isinstance(a, tuple | list):
        assert isinstance(b, tuple | list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_bits(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("dp_type", ALL_DP_TYPES)
def test_every_query_gives_the_same_bits_from_the_float32_sum_as_from_a_float64_copy(dp_type):
    acc = RoundAccumulator(_plan(dp_type))
    for update in _updates():
        acc.add(update)
    below = acc.below_threshold()
    view, copy = acc.update_sum_view(), acc.update_sum()
    assert [t.dtype for t in view] == [np.float32, np.float32]
    from_view = acc.query.finalize(view, 3, np.random.default_rng(9), below_threshold=below)
    from_copy = acc.query.finalize(copy, 3, np.random.default_rng(9), below_threshold=below)
    _assert_same_bits(from_view.mean, from_copy.mean)
    _assert_same_bits(from_view.metrics, from_copy.metrics)
    _assert_same_bits(from_view.state, from_copy.state)
    assert all(m.dtype == np.float64 for m in from_view.mean)
    # The sum itself was only read.
    _assert_same_bits(acc.update_sum(), copy)
