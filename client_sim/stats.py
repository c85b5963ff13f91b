"""Thread-safe counters of what the fleet did, for the progress line and the JSON summary."""

import threading
from collections import Counter, defaultdict

from fcp_server.protos import plan_pb2


class FleetStats:
    """Counters (check-ins, uploads, rejections by reason, failures...) and loss samples."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._loss: defaultdict[str, list[float]] = defaultdict(list)

    def add(self, key: str, n: int = 1) -> None:
        """Increments counter `key` by n."""
        with self._lock:
            self._counts[key] += n

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
        """A JSON-ready copy of every counter and the mean device loss per plan kind."""
        with self._lock:
            counts = dict(sorted(self._counts.items()))
            loss = {k: sum(v) / len(v) for k, v in self._loss.items() if v}
        return {"counts": counts, "mean_device_loss": loss}
