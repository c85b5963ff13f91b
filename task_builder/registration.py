"""Registers built tasks with the FCP server: create, upload artifacts, open; cancel on failure.

Step 8 of the build pipeline (ODP `task_builder_core` steps 5-6, odp-federated-compute.md
section 1.5), over the server's task-management HTTP API. Unlike the reference, the training
and eval tasks are created in ONE request (the server links the eval task to the new training
task), and any failure after creation cancels what was created, so a failed build leaves no
orphan CREATED task blocking the population.
"""

import logging
import types
import urllib.parse
from collections.abc import Sequence

import httpx
from google.protobuf.message import DecodeError, Message

from fcp_server.protos import task_builder_pb2, task_pb2
from task_builder import artifacts
from task_builder.errors import ArtifactBuildError, TaskConflictError, TaskManagementError

_LOG = logging.getLogger(__name__)
_PROTO = "application/x-protobuf"
_API = "/taskmanagement/v1/population"
_MAX_ERROR_CHARS = 500


class TaskManagementClient:
    """A typed client of the server's task-management API (binary protobuf bodies)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 120.0,
    ) -> None:
        """Connects lazily to `base_url`; `api_key` is sent as `x-api-key` on every call."""
        if not base_url.startswith(("http://", "https://")):
            raise TaskManagementError(
                f"task management server URL must be http(s), got {base_url!r}"
            )
        headers = {"x-api-key": api_key} if api_key else {}
        self._base = httpx.URL(base_url)
        self._http = httpx.Client(
            base_url=base_url, headers=headers, transport=transport, timeout=timeout
        )

    def __enter__(self) -> "TaskManagementClient":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection pool."""
        self._http.close()

    def _send(self, method: str, url: str, *, content: bytes, content_type: str) -> httpx.Response:
        target = httpx.URL(url)
        if target.is_absolute_url and (target.scheme, target.host, target.port) != (
            self._base.scheme,
            self._base.host,
            self._base.port,
        ):
            # The admin key must never travel to a host the server merely named.
            raise TaskManagementError(f"refusing artifact URL outside the server: {url}")
        try:
            response = self._http.request(
                method,
                url,
                content=content,
                headers={"content-type": content_type, "accept": _PROTO},
            )
        except httpx.HTTPError as e:
            raise TaskManagementError(
                f"Cannot reach the task management server at {self._base}: {e}"
            ) from e
        return response

    def _call(self, method: str, url: str, *, content: bytes, content_type: str) -> httpx.Response:
        response = self._send(method, url, content=content, content_type=content_type)
        if response.is_success:
            return response
        error = TaskConflictError if response.status_code == 409 else TaskManagementError
        raise error(f"{method} {url} failed: {response.status_code} {_error_text(response)}")

    def _proto_call(self, path: str, body: Message, reply: type[Message]) -> Message:
        response = self._call("POST", path, content=body.SerializeToString(), content_type=_PROTO)
        try:
            return reply.FromString(response.content)
        except DecodeError as e:
            raise TaskManagementError(
                f"POST {path}: the server's reply is not a {reply.__name__}"
            ) from e

    def create_tasks(
        self, population: str, task: task_pb2.Task, eval_task: task_pb2.Task | None = None
    ) -> task_pb2.CreateTaskResponse:
        """Creates `task` (and a linked `eval_task`) in CREATED status; returns them with ids."""
        request = task_pb2.CreateTaskRequest(task=task)
        if eval_task is not None:
            request.eval_task.CopyFrom(eval_task)
        path = f"{_API}/{_quote(population)}:create-task"
        reply = self._proto_call(path, request, task_pb2.CreateTaskResponse)
        assert isinstance(reply, task_pb2.CreateTaskResponse)
        return reply

    def put_artifact(self, url: str, data: bytes) -> None:
        """PUTs one artifact's raw bytes to a URL the server returned.

        Raises:
          ArtifactBuildError: when the server rejects the artifact (a 4xx other than 409).
          TaskManagementError: when the server cannot be reached or fails.
        """
        response = self._send("PUT", url, content=data, content_type="application/octet-stream")
        if response.is_success:
            return
        message = f"PUT {url} failed: {response.status_code} {_error_text(response)}"
        if 400 <= response.status_code < 500 and response.status_code != 409:
            # The server validated the artifact and refused it: the build produced bad bytes.
            raise ArtifactBuildError(f"Artifact failed to upload: {message}")
        error = TaskConflictError if response.status_code == 409 else TaskManagementError
        raise error(message)

    def _task_call(self, population: str, task_id: int, verb: str) -> task_pb2.Task:
        path = f"{_API}/{_quote(population)}/tasks/{task_id}:{verb}"
        reply = self._proto_call(path, task_pb2.GetTaskByIdResponse(), task_pb2.GetTaskByIdResponse)
        assert isinstance(reply, task_pb2.GetTaskByIdResponse)
        return reply.task

    def open_task(self, population: str, task_id: int) -> task_pb2.Task:
        """CREATED -> OPEN once its artifacts are uploaded; returns the task."""
        return self._task_call(population, task_id, "open")

    def cancel_task(self, population: str, task_id: int) -> task_pb2.Task:
        """Cancels an active task; returns it."""
        return self._task_call(population, task_id, "cancel")

    def get_task(self, population: str, task_id: int) -> task_pb2.Task:
        """Returns the task (TaskManagementError when it does not exist)."""
        path = f"{_API}/{_quote(population)}/tasks/{task_id}:get"
        response = self._call("GET", path, content=b"", content_type=_PROTO)
        return task_pb2.GetTaskByIdResponse.FromString(response.content).task

    def list_tasks(self, population: str) -> list[task_pb2.Task]:
        """Returns the population's tasks."""
        response = self._call(
            "GET", f"{_API}/{_quote(population)}/tasks", content=b"", content_type=_PROTO
        )
        return list(task_pb2.ListTasksResponse.FromString(response.content).tasks)


def _quote(population: str) -> str:
    return urllib.parse.quote(population, safe="")


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])[:_MAX_ERROR_CHARS]
    except (ValueError, KeyError, TypeError):
        return response.text[:_MAX_ERROR_CHARS]


def _artifacts(task: task_pb2.Task, plans: artifacts.PlanArtifacts) -> list[tuple[str, bytes]]:
    """Pairs each artifact URL the server returned with the bytes to upload there."""
    client_plan = plans.client_plan.SerializeToString()
    server_plan = plans.server_plan.SerializeToString()
    checkpoint = plans.initial_checkpoint
    out = [(url, client_plan) for url in task.client_only_plan_url[:1]]
    out += [(url, server_plan) for url in task.server_phase_url[:1]]
    if checkpoint is not None:
        if not task.init_checkpoint_url:
            raise TaskManagementError(f"the server gave task {task.task_id} no checkpoint URL")
        out.append((task.init_checkpoint_url[0], checkpoint))
    if len(out) < 2:
        raise TaskManagementError(f"the server gave task {task.task_id} no plan URLs")
    return out


def register_tasks(
    client: TaskManagementClient,
    population: str,
    main: tuple[task_pb2.Task, artifacts.PlanArtifacts],
    linked_eval: tuple[task_pb2.Task, artifacts.PlanArtifacts] | None = None,
) -> list[task_pb2.Task]:
    """Creates the tasks in one request, uploads their artifacts and opens them.

    Args:
      client: the server's task-management client.
      population: the population the tasks belong to.
      main: the main task (training; eval for EVAL_ONLY) and its TaskPlans.
      linked_eval: for TRAINING_AND_EVAL, the eval task (linked by the server) and its plans.

    Returns:
      The opened tasks, main first, as the server returned them.

    Raises:
      TaskManagementError, ArtifactBuildError: after cancelling every task it created.
    """
    created = client.create_tasks(population, main[0], linked_eval[0] if linked_eval else None)
    pairs = [(created.task, main[1])]
    if linked_eval is not None:
        pairs.append((created.eval_task, linked_eval[1]))
    try:
        for task, plans in pairs:
            for url, data in _artifacts(task, plans):
                client.put_artifact(url, data)
        return [client.open_task(population, task.task_id) for task, _ in pairs]
    except BaseException:
        _rollback(client, population, [task for task, _ in pairs])
        raise


def _rollback(
    client: TaskManagementClient, population: str, created: Sequence[task_pb2.Task]
) -> None:
    for task in created:
        try:
            client.cancel_task(population, task.task_id)
            _LOG.info("cancelled task %s/%d after a failed build", population, task.task_id)
        except TaskManagementError as e:
            _LOG.error("could not cancel task %s/%d: %s", population, task.task_id, e)


def task_group(tasks: Sequence[task_pb2.Task]) -> task_builder_pb2.TaskGroup:
    """Sorts registered tasks into a TaskGroup by their info kind."""
    group = task_builder_pb2.TaskGroup()
    for task in tasks:
        target = group.eval_task if task.info.HasField("evaluation_info") else group.training_task
        target.CopyFrom(task)
    return group
