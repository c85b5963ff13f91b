"""Noise drawn ahead (while the updates are summed) is the noise drawn at the close, bit for bit."""

import warnings

import numpy as np
import pytest

from fcp_server.aggregation import gaussian_noise
from fcp_server.aggregation.accumulator import RoundAccumulator
from fcp_server.aggregation.fedavg import finalize_round
from fcp_server.aggregation.state import ModelWeights, ServerState
from fcp_server.protos import plan_pb2
from tests.unit.aggregation.dp_rounds import ALL_DP_TYPES, noisy_plan
from tests.unit.aggregation.plan_builders import DpType, make_update

# Several noise blocks and steps in one tensor, and one smaller than a step.
SHAPES = [(2 * gaussian_noise._NOISE_BLOCK + 3 * gaussian_noise._NOISE_STEP + 7,), (5, 3)]


def _tensors(dtype: type = np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(4)
    return [rng.normal(size=s).astype(dtype) for s in SHAPES]


def _same_bits(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("divisor", [1.0, 3.0])
def test_prefetched_normals_give_the_noise_drawn_at_the_close(divisor):
    tensors = _tensors()
    here = gaussian_noise.noised(tensors, 0.7, np.random.default_rng(9), divisor=divisor)
    rng = np.random.default_rng(9)
    ahead = gaussian_noise.prefetch_normals(SHAPES, rng)
    got = gaussian_noise.noised(tensors, 0.7, rng, divisor=divisor, normals=ahead)
    _same_bits(got, here)
    assert all(g.dtype == np.float64 for g in got)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_prefetched_normals_round_each_value_once_to_the_dtypes_asked_for(dtype):
    tensors = _tensors()
    in_float64 = gaussian_noise.noised(tensors, 0.7, np.random.default_rng(9), divisor=3.0)
    rng = np.random.default_rng(9)
    ahead = gaussian_noise.prefetch_normals(SHAPES, rng, [np.dtype(dtype), np.dtype(np.float64)])
    got = gaussian_noise.noised(tensors, 0.7, rng, divisor=3.0, normals=ahead)
    _same_bits(got, (in_float64[0].astype(dtype), in_float64[1]))


def test_a_value_beyond_the_rounded_dtype_becomes_inf_without_a_warning():
    tensors = [np.full(SHAPES[0], 1e300), np.zeros(SHAPES[1])]
    rng = np.random.default_rng(1)
    ahead = gaussian_noise.prefetch_normals(SHAPES, rng, [np.dtype(np.float32)] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big, small = gaussian_noise.noised(tensors, 1.0, rng, normals=ahead)
    assert big.dtype == np.float32 and np.all(np.isposinf(big))
    assert np.all(np.isfinite(small))


def test_prefetched_normals_fit_only_their_generator_and_shapes_and_are_used_once():
    tensors = _tensors()
    rng = np.random.default_rng(2)
    ahead = gaussian_noise.prefetch_normals(SHAPES, rng)
    with pytest.raises(ValueError, match="another generator"):
        gaussian_noise.noised(tensors, 1.0, np.random.default_rng(2), normals=ahead)
    with pytest.raises(ValueError, match="shapes"):
        gaussian_noise.noised(tensors[:1], 1.0, rng, normals=ahead)
    gaussian_noise.noised(tensors, 1.0, rng, normals=ahead)
    with pytest.raises(ValueError, match="used already"):
        gaussian_noise.noised(tensors, 1.0, rng, normals=ahead)
    with pytest.raises(ValueError, match="floating dtype"):
        gaussian_noise.prefetch_normals(SHAPES, rng, [np.dtype(np.int32)] * 2)


def _plan(dp_type: DpType) -> plan_pb2.ServerPlan:
    return noisy_plan(dp_type, SHAPES, clients_per_round=3)


def _close(dp_type: DpType, ahead: bool):
    plan = _plan(dp_type)
    weights = ModelWeights(tuple(t * 0.1 for t in _tensors()), ())
    state = ServerState(weights, {}, {})
    acc = RoundAccumulator(plan, state.aggregator_state)
    rng = np.random.default_rng(5)
    if ahead:
        acc.start_noise(rng)
    for t in (1e-3, 2.0, -5.0):  # the last two are clipped
        acc.add(make_update(tuple(x * t for x in _tensors()), with_metrics=False))
    return acc, finalize_round(acc, state, plan, rng)


@pytest.mark.parametrize("dp_type", ALL_DP_TYPES)
def test_a_round_whose_noise_started_early_closes_with_the_same_bits(dp_type):
    acc, early = _close(dp_type, ahead=True)
    _, late = _close(dp_type, ahead=False)
    gaussian = dp_type in (DpType.FIXED_GAUSSIAN, DpType.ADAPTIVE_GAUSSIAN)
    assert (acc.prefetched_noise() is not None) == gaussian
    _same_bits(early.mean_update, late.mean_update)
    _same_bits(early.new_state.weights.trainable, late.new_state.weights.trainable)
    assert early.metrics == late.metrics
    assert early.new_state.aggregator_state.keys() == late.new_state.aggregator_state.keys()
    for key, value in early.new_state.aggregator_state.items():
        assert value.tobytes() == late.new_state.aggregator_state[key].tobytes()
    if gaussian:  # the noise was there: the noised mean is not the plain clipped mean
        assert all(m.dtype == np.float32 for m in early.mean_update)
        assert early.metrics["server/aggregator/dp/noise_stddev"] > 0


def test_the_noise_starts_once_and_the_close_needs_the_same_generator():
    plan = _plan(DpType.FIXED_GAUSSIAN)
    acc = RoundAccumulator(plan)
    rng = np.random.default_rng(5)
    acc.start_noise(rng)
    with pytest.raises(ValueError, match="started already"):
        acc.start_noise(rng)
    acc.add(make_update(tuple(_tensors()), with_metrics=False))
    state = ServerState(ModelWeights(tuple(_tensors()), ()), {}, {})
    with pytest.raises(ValueError, match="another generator"):
        finalize_round(acc, state, plan, np.random.default_rng(5))
