"""Watches a population's tasks on the server to decide when the fleet may stop.

Uses the task-management listing (GET /taskmanagement/v1/population/{pop}/tasks ->
ListTasksResponse), whose Task records carry `completed_iterations` and status. The fleet
stops once the training task (or, without one, the eval task) has completed the requested
number of rounds, optionally also waiting for eval rounds, or when the task ended.
"""

import logging
from dataclasses import dataclass

import httpx
from google.protobuf.message import DecodeError

from fcp_server.protos import task_pb2

_LOG = logging.getLogger(__name__)
ADMIN_KEY_HEADER = "x-api-key"
_TERMINAL = (
    task_pb2.TaskStatus.COMPLETED,
    task_pb2.TaskStatus.CANCELED,
    task_pb2.TaskStatus.FAILED,
)


class TaskWatchError(Exception):
    """The task listing could not be read."""


def is_eval_task(task: task_pb2.Task) -> bool:
    """True for evaluation tasks (TaskInfo.evaluation_info set)."""
    return bool(task.info.WhichOneof("info") == "evaluation_info")


def list_tasks(
    http: httpx.Client, population: str, admin_key: str | None = None
) -> list[task_pb2.Task]:
    """Fetches the population's tasks.

    Raises:
      TaskWatchError: on a network error, a non-200 answer or an undecodable body.
    """
    headers = {"Accept": "application/x-protobuf"}
    if admin_key:
        headers[ADMIN_KEY_HEADER] = admin_key
    try:
        resp = http.get(f"/taskmanagement/v1/population/{population}/tasks", headers=headers)
    except httpx.TransportError as e:
        raise TaskWatchError(f"task listing failed: {e}") from e
    if resp.status_code != 200:
        raise TaskWatchError(f"task listing: HTTP {resp.status_code}: {resp.text[:200]}")
    out = task_pb2.ListTasksResponse()
    try:
        out.ParseFromString(resp.content)
    except DecodeError as e:
        raise TaskWatchError(f"task listing: undecodable body: {e}") from e
    return list(out.tasks)


@dataclass(frozen=True)
class RoundGoal:
    """Stop once the training task completed `rounds` and the eval task `eval_rounds`.

    With `eval_until_end` the eval task must have ended instead: the server ends it after it
    evaluated the training task's final result.
    """

    rounds: int
    eval_rounds: int = 0
    eval_until_end: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.eval_rounds < 0:
            raise ValueError("round goals must be >= 0")

    def reached(self, tasks: list[task_pb2.Task]) -> bool:
        """True when each goal is met (or its task ended); False while any is pending."""
        # The newest task of each kind is the one the fleet is working on.
        train = sorted((t for t in tasks if not is_eval_task(t)), key=lambda t: t.task_id)
        evals = sorted((t for t in tasks if is_eval_task(t)), key=lambda t: t.task_id)
        main, extra = (train, evals) if train else (evals, [])
        if not main:
            return False
        checks = [(main[-1], self.rounds)]
        if extra and self.eval_until_end:
            return main[-1].status in _TERMINAL and extra[-1].status in _TERMINAL
        if extra and self.eval_rounds:
            checks.append((extra[-1], self.eval_rounds))
        return all(t.completed_iterations >= n or t.status in _TERMINAL for t, n in checks)


def progress(tasks: list[task_pb2.Task]) -> dict[str, dict[str, object]]:
    """Per-task status and completed rounds, JSON-ready."""
    return {
        str(t.task_id): {
            "kind": "eval" if is_eval_task(t) else "training",
            "status": task_pb2.TaskStatus.Enum.Name(t.status),
            "completed_rounds": t.completed_iterations,
            "epsilon_spent": t.epsilon_spent,
        }
        for t in tasks
    }
