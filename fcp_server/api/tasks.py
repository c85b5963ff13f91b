"""Task-management HTTP API (the task builder's side): create, artifacts, open, cancel, get, list.

Paths and messages follow ODP's TaskManagementController (odp-federated-compute.md section
2.4) plus the artifact, open, cancel and list calls this project's builder uses. Admin calls
carry `x-api-key: <key>` (or `?key=<key>` as ODP's API gateway); with no key configured (the
embedded demo) they are open. Handlers only parse, call a service inside one transaction and
serialise.
"""

from flask import Blueprint, Response, request

from fcp_server import errors
from fcp_server.api import bodies, wire
from fcp_server.api.context import db_session, server
from fcp_server.protos import task_pb2
from fcp_server.services import artifacts, auth, blob_paths, task_cancel, task_open, tasks

blueprint = Blueprint("tasks", __name__, url_prefix="/taskmanagement/v1")


@blueprint.before_request
def _require_admin_key() -> None:
    presented = request.headers.get(auth.ADMIN_KEY_HEADER) or request.args.get("key")
    if not auth.admin_key_ok(server().settings.admin_api_key, presented):
        raise errors.Unauthenticated("a valid admin API key is required (header x-api-key)")


@blueprint.before_request
def _check_population() -> None:
    # Before any query or blob name is built from it (PostgreSQL refuses NUL in text: a 500).
    pop = (request.view_args or {}).get("pop")
    if isinstance(pop, str):
        tasks.check_population(pop)


def _task_response(pop: str, task_id: int) -> Response:
    session = db_session()
    with session.begin():
        task = tasks.get_task(session, pop, task_id)
        return wire.respond(task_pb2.GetTaskByIdResponse(task=tasks.task_proto(task)))


@blueprint.post("/population/<pop>:create-task")
def create_task(pop: str) -> Response:
    """Creates a CREATED task (and its linked eval task) and returns their artifact URLs."""
    body = wire.parse(task_pb2.CreateTaskRequest, allow_empty=False)
    ctx, session = server(), db_session()
    with session.begin():
        main, evaluation = tasks.create_tasks(
            session=session, pop=pop, request=body, now=ctx.clock.now()
        )
        response = task_pb2.CreateTaskResponse(task=tasks.task_proto(main))
        if evaluation is not None:
            response.eval_task.CopyFrom(tasks.task_proto(evaluation))
    return wire.respond(response, status=201)


@blueprint.put("/population/<pop>/tasks/<int:task_id>/artifacts/<kind>")
def put_artifact(pop: str, task_id: int, kind: str) -> Response:
    """Stores one builder artifact (raw bytes) of a CREATED task."""
    if kind not in blob_paths.ARTIFACT_KINDS:
        raise errors.NotFound(f"unknown artifact {kind!r}")
    ctx, session = server(), db_session()
    data = bodies.read_body(ctx.settings.max_artifact_bytes)
    with session.begin():
        artifacts.put_artifact(
            session=session,
            blobs=ctx.blobs,
            pop=pop,
            task_id=task_id,
            kind=kind,
            data=data,
            max_bytes=ctx.settings.max_artifact_bytes,
        )
    return Response(status=204)


@blueprint.post("/population/<pop>/tasks/<int:task_id>:open")
def open_task(pop: str, task_id: int) -> Response:
    """CREATED -> OPEN (all artifacts present) and the first round starts."""
    ctx, session = server(), db_session()
    with session.begin():
        task_open.open_task(
            session=session,
            blobs=ctx.blobs,
            pop=pop,
            task_id=task_id,
            now=ctx.clock.now(),
            settings=ctx.settings,
        )
    return _task_response(pop, task_id)


@blueprint.post("/population/<pop>/tasks/<int:task_id>:cancel")
def cancel_task(pop: str, task_id: int) -> Response:
    """Any active status -> CANCELED (the builder's rollback of a failed build)."""
    ctx, session = server(), db_session()
    with session.begin():
        task_cancel.cancel_task(session=session, pop=pop, task_id=task_id, now=ctx.clock.now())
    return _task_response(pop, task_id)


@blueprint.get("/population/<pop>/tasks/<int:task_id>:get")
def get_task(pop: str, task_id: int) -> Response:
    """The task, or 404."""
    return _task_response(pop, task_id)


@blueprint.get("/population/<pop>/tasks")
def list_tasks(pop: str) -> Response:
    """The population's tasks, newest first; 400 for a malformed population name."""
    tasks.check_population(pop)
    session = db_session()
    with session.begin():
        rows = tasks.list_tasks(session, pop)
        return wire.respond(task_pb2.ListTasksResponse(tasks=[tasks.task_proto(t) for t in rows]))
