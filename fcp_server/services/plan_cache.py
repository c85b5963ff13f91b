"""Per-process cache of parsed server plans, so each upload does not re-read the plan blob.

A task's plan is immutable once the task is open (artifacts can only change while CREATED),
so entries are keyed by the plan's SHA-256 and never go stale; the cache is bounded (LRU).
"""

import collections
import threading

from fcp_server.protos import plan_pb2
from fcp_server.services import artifacts
from fcp_server.storage.blobs import BlobStore
from fcp_server.storage.models import Task


class PlanCache:
    """A small thread-safe LRU of ServerPlans keyed by (population, task id, plan sha256)."""

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max = max_entries
        self._plans: collections.OrderedDict[tuple[str, int, str], plan_pb2.ServerPlan] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def server_plan(self, blobs: BlobStore, task: Task, max_bytes: int) -> plan_pb2.ServerPlan:
        """The task's parsed server plan, read from the blob store on a miss."""
        key = (task.population_name, task.task_id, task.server_plan_sha256 or "")
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = artifacts.load_server_plan(blobs, task, max_bytes)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self._max:
                self._plans.popitem(last=False)
        return plan
