import math
import os
import signal
import time

import numpy as np
import pytest

from fcp_server.aggregation import dp, gaussian_noise
from fcp_server.aggregation.state import Tensor
from tests.unit.aggregation import reference_dp


def _tensors() -> tuple[Tensor, Tensor]:
    return (np.array([[3.0, 0.0], [0.0, 0.0]], np.float32), np.array([4.0], np.float32))


def test_global_norms_span_all_tensors():
    assert reference_dp.global_l2_norm(_tensors()) == pytest.approx(5.0)
    assert dp.global_linf_norm(_tensors()) == pytest.approx(4.0)
    assert dp.global_linf_norm([np.zeros(0, np.float32)]) == 0.0


def test_clip_l2_keeps_a_record_within_the_bound():
    clipped, norm, was_clipped = reference_dp.clip_l2(_tensors(), 5.0)
    assert not was_clipped
    assert norm == pytest.approx(5.0)
    for out, original in zip(clipped, _tensors(), strict=True):
        np.testing.assert_array_equal(out, original)
        assert out.dtype == original.dtype


def test_clip_l2_scales_to_the_bound_like_clip_by_global_norm():
    clipped, norm, was_clipped = reference_dp.clip_l2(_tensors(), 1.0)
    assert was_clipped
    assert norm == pytest.approx(5.0)
    assert reference_dp.global_l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    # Same direction: every element scaled by clip / norm.
    np.testing.assert_allclose(clipped[1], [0.8], rtol=1e-6)
    np.testing.assert_allclose(clipped[0], [[0.6, 0.0], [0.0, 0.0]], rtol=1e-6)
    assert clipped[0].dtype == np.float32


def test_clip_l2_bounds_a_huge_adversarial_record():
    huge = (np.full((1000,), 1e30), np.full((3,), -1e30))
    clipped, _, was_clipped = reference_dp.clip_l2(huge, 0.5)
    assert was_clipped
    assert reference_dp.global_l2_norm(clipped) == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize("clip", [0.0, -1.0, math.inf, math.nan])
def test_clip_l2_rejects_a_bad_clip(clip):
    with pytest.raises(ValueError, match="clip"):
        reference_dp.clip_l2(_tensors(), clip)


def test_clip_l2_rejects_non_finite_records():
    with pytest.raises(ValueError, match="finite"):
        reference_dp.clip_l2((np.array([np.nan]),), 1.0)


def test_zeroing_by_linf_norm_is_strictly_greater_than():
    kept, zeroed = reference_dp.zero_if_linf_exceeds(_tensors(), 4.0)
    assert not zeroed
    np.testing.assert_array_equal(kept[1], [4.0])
    out, zeroed = reference_dp.zero_if_linf_exceeds(_tensors(), 3.9)
    assert zeroed
    assert all(not t.any() for t in out)
    assert [t.shape for t in out] == [(2, 2), (1,)]
    with pytest.raises(ValueError, match="zeroing_norm"):
        reference_dp.zero_if_linf_exceeds(_tensors(), 0.0)


def test_zero_non_finite_zeroes_the_whole_record():
    record = (np.array([1.0, 2.0]), np.array([np.inf]))
    out, non_finite = reference_dp.zero_non_finite(record)
    assert non_finite
    assert all(not t.any() for t in out)
    out, non_finite = reference_dp.zero_non_finite(_tensors())
    assert not non_finite
    np.testing.assert_array_equal(out[1], [4.0])


def test_noise_stddev_is_z_times_clip():
    assert dp.noise_stddev(1.5, 0.2) == pytest.approx(0.3)
    assert dp.noise_stddev(0.0, 0.2) == 0.0
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp.noise_stddev(-1.0, 1.0)
    with pytest.raises(ValueError, match="clip"):
        dp.noise_stddev(1.0, 0.0)


def test_gaussian_noise_has_the_requested_moments():
    n = 200_000
    std = 2.5
    rng = np.random.default_rng(1234)
    (noised,) = gaussian_noise.noised([np.zeros(n, np.float64)], std, rng)
    # The sample std of n normals has standard error ~ std / sqrt(2n); allow 6 of them.
    assert abs(noised.std() - std) < 6 * std / math.sqrt(2 * n)
    assert abs(noised.mean()) < 6 * std / math.sqrt(n)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_gaussian_noise_depends_on_the_generator_only_not_on_the_threads(monkeypatch, threads):
    # Several blocks per tensor, and a tensor smaller than one block.
    shapes = [(3 * gaussian_noise._NOISE_BLOCK + 5,), (7, 3)]
    tensors = [np.zeros(s, np.float64) for s in shapes]
    monkeypatch.setattr(gaussian_noise, "_MAX_NOISE_THREADS", 1)
    gaussian_noise._noise_threads.cache_clear()
    reference = gaussian_noise.noised(tensors, 1.0, np.random.default_rng(7))
    monkeypatch.setattr(gaussian_noise, "_MAX_NOISE_THREADS", threads)
    gaussian_noise._noise_threads.cache_clear()
    try:
        again = gaussian_noise.noised(tensors, 1.0, np.random.default_rng(7))
    finally:
        gaussian_noise._noise_threads.cache_clear()
    for a, b in zip(reference, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # Each block has a stream of its own: no two blocks repeat each other's values.
    flat = reference[0]
    first, second = (
        flat[: gaussian_noise._NOISE_BLOCK],
        flat[gaussian_noise._NOISE_BLOCK : 2 * gaussian_noise._NOISE_BLOCK],
    )
    assert not np.array_equal(first, second)
    # A different generator gives different noise.
    other = gaussian_noise.noised(tensors, 1.0, np.random.default_rng(8))
    assert not np.array_equal(other[1], reference[1])


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("divisor", [1.0, 3.0])
def test_noise_is_drawn_block_by_block_as_documented(divisor, ahead):
    # The documented construction with whole-block numpy passes: one stream spawned per block,
    # normal draws times std, plus the values, divided by the divisor.
    rng_values = np.random.default_rng(3)
    tensors = [
        rng_values.normal(
            size=2 * gaussian_noise._NOISE_BLOCK + 3 * gaussian_noise._NOISE_STEP + 11
        ).astype(np.float32),
        np.full((5, 3), 2.0, np.float32),
    ]
    std = 0.7
    streams = iter(np.random.default_rng(9).spawn(4))
    expected = []
    for t in tensors:
        flat = t.reshape(-1).astype(np.float64)
        blocks = []
        for start in range(0, flat.size, gaussian_noise._NOISE_BLOCK):
            values = flat[start : start + gaussian_noise._NOISE_BLOCK]
            noise = next(streams).standard_normal(values.size)
            blocks.append((noise * std + values) / divisor)
        expected.append(np.concatenate(blocks).reshape(t.shape))
    rng = np.random.default_rng(9)
    normals = gaussian_noise.prefetch_normals([t.shape for t in tensors], rng) if ahead else None
    got = gaussian_noise.noised(tensors, std, rng, divisor=divisor, normals=normals)
    for a, b in zip(got, expected, strict=True):
        assert a.tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="divisor"):
        gaussian_noise.noised(tensors, std, np.random.default_rng(9), divisor=0.0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_noise_with_threads_of_its_own():
    tensors = [np.zeros(2 * gaussian_noise._NOISE_BLOCK, np.float64)]
    gaussian_noise.noised(tensors, 1.0, np.random.default_rng(1))  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: the inherited pool has no threads; a hang would be the bug
        try:
            (out,) = gaussian_noise.noised(tensors, 1.0, np.random.default_rng(1))
            os._exit(0 if out.std() > 0.5 else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("noise in a forked child did not finish within 60 s")


def test_zero_std_gives_the_values_in_float64_and_bad_input_is_refused():
    x = (np.ones((3, 2), np.float32),)
    (out,) = gaussian_noise.noised(x, 0.0, np.random.default_rng(0))
    assert out.dtype == np.float64 and out.shape == (3, 2)
    np.testing.assert_array_equal(out, x[0])
    with pytest.raises(ValueError, match="floating"):
        gaussian_noise.noised((np.ones(2, np.int64),), 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="std"):
        gaussian_noise.noised(x, -1.0, np.random.default_rng(0))


def test_noise_rng_is_seeded_from_os_entropy():
    a, b = gaussian_noise.make_noise_rng(), gaussian_noise.make_noise_rng()
    assert isinstance(a, np.random.Generator)
    # Two independently seeded generators agree on 8 normals with probability ~0.
    assert not np.array_equal(a.normal(size=8), b.normal(size=8))
