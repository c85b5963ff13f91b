"""Wall-clock helpers shared by the benchmarks (best of a few repeats on a noisy machine)."""

import time
from collections.abc import Callable


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` runs of `run()`, in seconds (the least disturbed one)."""
    best = float("inf")
    for _ in range(max(repeats, 1)):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best
