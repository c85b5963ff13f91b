"""Metric states a hostile device may upload, crafted against the server's finalizers."""

from collections.abc import Iterator

import numpy as np


def zig_zag_curves(num_thresholds: int, big: float) -> Iterator[np.ndarray]:
    """Flattened [tp, fp, tn, fn] that zig-zag over the thresholds with period 4.

    The false-positive rate goes up where the recall is high (and down where it is low), so the
    AUC trapezoids add up over the thresholds instead of cancelling: without a projection onto
    real confusion curves, one device with a handful of examples moves the AUC by several units.
    """
    i = np.arange(num_thresholds)
    for phase in range(4):
        high = ((i + phase) // 2) % 2 == 1
        tp = np.where(high, big, 0.0)
        fn = big - tp
        for fp in (np.where(np.roll(high, 1), big, 0.0), np.where(np.roll(high, -1), big, 0.0)):
            yield np.concatenate([tp, fp, big - fp, fn])
            yield np.concatenate([big - tp, fp, big - fp, big - fn])


def random_states(rng: np.random.Generator, size: int, count: int) -> Iterator[np.ndarray]:
    """States with log-uniform magnitudes in [1e-3, 1e9], mostly positive."""
    for _ in range(count):
        magnitude = 10.0 ** rng.uniform(-3.0, 9.0, size)
        yield magnitude * rng.choice([-1.0, 1.0], size, p=[0.2, 0.8])
