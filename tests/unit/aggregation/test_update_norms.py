import math

import numpy as np
import pytest

from fcp_server.aggregation import update_norms

N = 1_663_370  # the EMNIST CNN's parameter count: many dot-product chunks


def _exact(tensors):
    return math.fsum(float(np.sum(np.square(t.astype(np.float64)))) for t in tensors)


@pytest.mark.parametrize("value", [0.1, 1e-3, 0.7, 3.0])
def test_constant_updates_the_worst_case_for_float32_dots_stay_within_4e_6(value):
    # Every rounding of a constant vector's dot product goes the same way; one dot product
    # over all elements is off by ~3e-4 here, the chunked sum must stay near the exact norm.
    tensors = (np.full(N, value, np.float32), np.full((7, 3), value, np.float32))
    assert update_norms.sum_of_squares(tensors) == pytest.approx(_exact(tensors), rel=4e-6)


def test_random_updates_match_the_exact_sum():
    rng = np.random.default_rng(0)
    tensors = (rng.standard_normal((1000, 333)).astype(np.float32), rng.random(17, np.float32))
    assert update_norms.sum_of_squares(tensors) == pytest.approx(_exact(tensors), rel=1e-7)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_element_gives_nan(bad):
    t = np.ones(100_000, np.float32)
    t[77_777] = bad
    assert math.isnan(update_norms.sum_of_squares((np.ones(3, np.float32), t)))


def test_huge_finite_float32_values_are_summed_exactly_not_reported_non_finite():
    # 1e30**2 overflows float32 but not float64: finite, and the exact sum is returned.
    tensors = (np.full(10, 1e30, np.float32),)
    assert update_norms.sum_of_squares(tensors) == pytest.approx(_exact(tensors), rel=1e-12)


def test_other_dtypes_are_summed_exactly():
    tensors = (np.full(5, 1e100, np.float64), np.full(3, 2.0, np.float16))
    assert update_norms.sum_of_squares(tensors) == pytest.approx(5e200 + 12, rel=1e-12)


def test_sum_dtype_is_float32_or_wider():
    assert update_norms.sum_dtype(np.dtype(np.float16)) == np.float32
    assert update_norms.sum_dtype(np.dtype(np.float32)) == np.float32
    assert update_norms.sum_dtype(np.dtype(np.float64)) == np.float64


@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize(
    ("update_dtype", "sum_dtype"),
    # BLAS saxpy, BLAS daxpy, and the chunked numpy path for mixed dtypes.
    [(np.float32, np.float32), (np.float64, np.float64), (np.float16, np.float32)],
)
def test_add_scaled_adds_every_element_once(scale, update_dtype, sum_dtype):
    rng = np.random.default_rng(1)
    # Sizes around the chunk length catch a dropped or repeated tail.
    shapes = [(update_norms._ADD_CHUNK + 5,), (3, update_norms._ADD_CHUNK // 3 + 1), (1,)]
    sums = [np.full(s, 2.0, sum_dtype) for s in shapes]
    update = [rng.standard_normal(s).astype(update_dtype) for s in shapes]
    update_norms.add_scaled(sums, update, scale)
    update_norms.add_scaled(sums, update, scale)
    for total, t in zip(sums, update, strict=True):
        assert total.dtype == sum_dtype
        expected = 2.0 + 2.0 * t.astype(np.float64) * (1.0 if scale is None else scale)
        np.testing.assert_allclose(total, expected, rtol=1e-6, atol=1e-6)


def test_add_scaled_adds_read_only_views_of_an_upload():
    data = np.arange(6, dtype=np.float32).tobytes()
    view = np.frombuffer(data, np.float32).reshape(2, 3)
    total = np.ones((2, 3), np.float32)
    update_norms.add_scaled([total], [view], 0.5)
    np.testing.assert_array_equal(total, 1.0 + 0.5 * np.arange(6).reshape(2, 3))


def test_add_scaled_refuses_a_non_contiguous_sum():
    total = np.zeros((4, 4), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        update_norms.add_scaled([total], [np.ones((4, 2), np.float32)], None)
