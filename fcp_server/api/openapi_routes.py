"""The operations of the server's HTTP API, one `Route` per Flask rule, for the OpenAPI document.

Each route names what it takes (path, header and query parameters, a protobuf message or raw
bytes) and what it answers besides the error document every route may answer (added by
`openapi.document`). The test suite checks this table against the app's URL map, so a new
Flask rule without a route here (or a stale route) fails the build.
"""

import dataclasses
from typing import Any

from google.protobuf.descriptor import Descriptor

from fcp_server.api import dashboard
from fcp_server.protos import task_assignments_pb2, task_pb2
from fcp_server.services import blob_paths
from fcp_server.storage.models import MAX_ID

Schema = dict[str, Any]
OCTETS = "application/octet-stream"
DOCUMENT_PATH = "/openapi.json"
_ID: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_ID}
_TM = f"{blob_paths.TM_PREFIX}/population/{{pop}}"
_TA = f"{blob_paths.TA_PREFIX}/population/{{pop}}"
_ASSIGNMENT = f"{_TA}/task/{{task_id}}/aggregation/{{round_id}}/task-assignment/{{assignment_id}}"
# Security alternatives; `{}` because the embedded demo runs without credentials.
Security = tuple[dict[str, list[str]], ...]
ADMIN: Security = ({"adminKey": []}, {"adminKeyQuery": []}, {})
DEVICE: Security = ({"deviceToken": []}, {})


@dataclasses.dataclass(frozen=True)
class Reply:
    """A documented answer besides the error document."""

    status: str
    description: str
    # A protobuf message (binary or proto3 JSON), a media type, or None for no body.
    body: Descriptor | str | None = None
    # Schema of a media-type body (default: a string, or binary bytes for OCTETS).
    schema: Schema | None = None


@dataclasses.dataclass(frozen=True)
class Route:
    """One operation: a method on a path template, with what it takes and answers."""

    method: str
    # OpenAPI path template; each `{name}` is described in `params`.
    path: str
    summary: str
    tag: str
    replies: tuple[Reply, ...]
    params: tuple[Schema, ...] = ()
    # A protobuf message (binary or proto3 JSON), OCTETS for raw bytes, or None.
    body: Descriptor | str | None = None
    body_required: bool = False
    security: Security = ()


def _path(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


def _optional(where: str, name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": where,
        "required": False,
        "schema": schema,
        "description": description,
    }


POP = _path(
    "pop",
    {"type": "string", "pattern": blob_paths.POPULATION_PATTERN},
    "Population name: 1-64 of [A-Za-z0-9_.-], starting with a letter or digit.",
)
TASK = _path("task_id", _ID, "Task id within the population.")
ROUND = _path("round_id", _ID, "Round (aggregation) id.")
RESULT = _path("result_id", _ID, "Result id: 0 is the initial model, N the one after round N.")
ASSIGNMENT = _path(
    "assignment_id",
    {"type": "string", "pattern": blob_paths.ASSIGNMENT_PATTERN},
    "Assignment id (lowercase uuid4) from the check-in answer.",
)
_KIND = _path("kind", {"type": "string", "enum": sorted(blob_paths.ARTIFACT_KINDS)}, "Artifact.")
_FILENAME = _path("filename", {"type": "string", "minLength": 1}, "Asset file name.")
_CACHING = (
    _optional("header", "If-None-Match", {"type": "string"}, "ETag of a cached copy (304)."),
    _optional("header", "Accept-Encoding", {"type": "string"}, "gzip for a compressed body."),
)
_ENCODING = _optional(
    "header", "Content-Encoding", {"type": "string", "enum": ["gzip", "identity"]}, "Encoding."
)
_WINDOW = _optional(
    "query",
    "window_minutes",
    {"type": "integer", "minimum": 1, "maximum": dashboard.MAX_WINDOW_MINUTES},
    "How far back the operations charts look.",
)
_TASK_REPLY = Reply("200", "The task.", task_pb2.GetTaskByIdResponse.DESCRIPTOR)
_CHECKIN = task_assignments_pb2.CreateTaskAssignmentResponse.DESCRIPTOR
_NOT_MODIFIED = Reply("304", "The cached copy is current.")
_ASSET = Reply("200", "A static asset.", "*/*")


def _task_management() -> tuple[Route, ...]:
    def route(method: str, path: str, summary: str, *replies: Reply, **kw: Any) -> Route:
        return Route(method, path, summary, "task management", replies, security=ADMIN, **kw)

    created = Reply("201", "Created.", task_pb2.CreateTaskResponse.DESCRIPTOR)
    listed = Reply("200", "The tasks, newest first.", task_pb2.ListTasksResponse.DESCRIPTOR)
    one = (POP, TASK)
    return (
        route(
            "post",
            f"{_TM}:create-task",
            "Create a task (and its linked eval task).",
            created,
            params=(POP,),
            body=task_pb2.CreateTaskRequest.DESCRIPTOR,
            body_required=True,
        ),
        route(
            "put",
            f"{_TM}/tasks/{{task_id}}/artifacts/{{kind}}",
            "Store a builder artifact.",
            Reply("204", "Stored."),
            params=(*one, _KIND),
            body=OCTETS,
            body_required=True,
        ),
        route(
            "post", f"{_TM}/tasks/{{task_id}}:open", "Open a CREATED task.", _TASK_REPLY, params=one
        ),
        route("post", f"{_TM}/tasks/{{task_id}}:cancel", "Cancel a task.", _TASK_REPLY, params=one),
        route("get", f"{_TM}/tasks/{{task_id}}:get", "Get a task.", _TASK_REPLY, params=one),
        route("get", f"{_TM}/tasks", "List the population's tasks.", listed, params=(POP,)),
    )


def _devices() -> tuple[Route, ...]:
    def route(method: str, path: str, summary: str, *replies: Reply, **kw: Any) -> Route:
        return Route(method, path, summary, "devices", replies, security=DEVICE, **kw)

    ids = (POP, TASK, ROUND, ASSIGNMENT)
    report = Reply(
        "200",
        "An upload instruction, a rejection, or an acknowledgement.",
        task_assignments_pb2.ReportResultResponse.DESCRIPTOR,
    )
    return (
        route(
            "post",
            f"{_TA}:create-task-assignment",
            "Device check-in.",
            Reply("201", "A task assignment.", _CHECKIN),
            Reply("200", "A rejection with a retry window.", _CHECKIN),
            Reply("401", "UNAUTHENTICATED rejection (device auth on, bad token).", _CHECKIN),
            params=(POP,),
            body=task_assignments_pb2.CreateTaskAssignmentRequest.DESCRIPTOR,
        ),
        route(
            "put",
            f"{_ASSIGNMENT}:report-result",
            "Report how the local work ended.",
            report,
            params=ids,
            body=task_assignments_pb2.ReportResultRequest.DESCRIPTOR,
        ),
        route(
            "put",
            f"{_ASSIGNMENT}:upload",
            "Upload the update (safetensors, raw or gzip).",
            Reply("204", "Accepted, or an identical retry."),
            params=(*ids, _ENCODING),
            body=OCTETS,
            body_required=True,
        ),
        route(
            "get",
            f"{_TA}/task/{{task_id}}/client_only_plan",
            "Download the device plan.",
            Reply("200", "The fcp.ClientOnlyPlan.", OCTETS),
            _NOT_MODIFIED,
            params=(POP, TASK, *_CACHING),
        ),
        route(
            "get",
            f"{_TA}/task/{{task_id}}/aggregation/{{result_id}}/client_checkpoint",
            "Download the weights devices start from.",
            Reply("200", "Safetensors weights.", OCTETS),
            _NOT_MODIFIED,
            params=(POP, TASK, RESULT, *_CACHING),
        ),
    )


def _operations() -> tuple[Route, ...]:
    snapshot = Reply(
        "200",
        "The dashboard snapshot.",
        "application/json",
        {"$ref": "#/components/schemas/DashboardSnapshot"},
    )
    document = Reply("200", "This document.", "application/json", {"type": "object"})
    return (
        Route("get", "/healthz", "Liveness.", "ops", (Reply("200", "Up.", "text/plain"),)),
        Route(
            "get",
            "/ready",
            "Readiness: the database answers.",
            "ops",
            (Reply("200", "Ready.", "text/plain"), Reply("503", "No database.", "text/plain")),
        ),
        Route(
            "get",
            "/metrics",
            "Prometheus metrics.",
            "ops",
            (Reply("200", "Text exposition format 0.0.4.", "text/plain"),),
        ),
        Route(
            "get",
            "/dashboard",
            "The dashboard page.",
            "dashboard",
            (Reply("200", "HTML page.", "text/html"),),
            params=(_WINDOW,),
            security=ADMIN,
        ),
        Route(
            "get",
            "/dashboard/data.json",
            "The dashboard data.",
            "dashboard",
            (snapshot,),
            params=(_WINDOW,),
            security=ADMIN,
        ),
        Route(
            "get",
            "/dashboard/static/{filename}",
            "The dashboard's script and stylesheet.",
            "dashboard",
            (_ASSET,),
            params=(_FILENAME,),
        ),
        Route("get", DOCUMENT_PATH, "This OpenAPI description.", "ops", (document,)),
    )


def routes() -> tuple[Route, ...]:
    """Every operation of the server, in the order the document lists them."""
    return _task_management() + _devices() + _operations()
