"""Thread-safe counters of what the fleet did, for the progress line and the JSON summary.

Besides counters it keeps the wall seconds the sessions spent per phase (check-in, downloads,
training, report, upload, waiting between sessions), so a slow fleet shows where its time
went without a profiler.
"""

import contextlib
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator

from fcp_server.protos import plan_pb2


class FleetStats:
    """Counters (check-ins, uploads, rejections by reason, failures...) and loss samples."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._loss: defaultdict[str, list[float]] = defaultdict(list)
        self._seconds: defaultdict[str, float] = defaultdict(float)

    def add(self, key: str, n: int = 1) -> None:
        """Increments counter `key` by n."""
        with self._lock:
            self._counts[key] += n

    def add_seconds(self, phase: str, seconds: float) -> None:
        """Adds wall seconds spent in `phase` (summed over all session threads)."""
        with self._lock:
            self._seconds[phase] += seconds

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Adds the wall time of the `with` block to `phase`, also when it raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add_seconds(phase, time.perf_counter() - started)

    def observe_loss(self, kind: plan_pb2.PlanKind.Enum, loss: float) -> None:
        """Records a device's mean loss for a training or eval session."""
        name = plan_pb2.PlanKind.Enum.Name(kind).lower()
        with self._lock:
            self._loss[name].append(loss)

    def get(self, key: str) -> int:
        """The current value of a counter."""
        with self._lock:
            return self._counts[key]

    def prefixed(self, prefix: str) -> int:
        """Sum of the counters whose key starts with `prefix`."""
        with self._lock:
            return sum(v for k, v in self._counts.items() if k.startswith(prefix))

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready copy of every counter, the phase seconds and the mean device loss."""
        with self._lock:
            counts = dict(sorted(self._counts.items()))
            seconds = {k: round(v, 3) for k, v in sorted(self._seconds.items())}
            loss = {k: sum(v) / len(v) for k, v in self._loss.items() if v}
        return {"counts": counts, "phase_seconds": seconds, "mean_device_loss": loss}
