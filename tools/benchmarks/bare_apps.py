"""Baseline WSGI apps served with the same gunicorn config as the FCP server.

* `read_body_app`: reads the request body and answers 204 - the ceiling for upload ingest (B3).
* `flask_checkin_app()`: a Flask endpoint on the check-in path that parses the request proto
  and answers a fixed TaskAssignment - the ceiling for check-ins (B4) without any database.
Serve them as `tools.benchmarks.bare_apps:read_body_app` / `...:flask_checkin_app()`.
"""

from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, request

from fcp_server.protos import task_assignments_pb2

_CHUNK = 1 << 20


def read_body_app(
    environ: dict[str, Any], start_response: Callable[[str, list[tuple[str, str]]], Any]
) -> Iterable[bytes]:
    """Reads the whole body (in 1 MiB reads) and answers 204 No Content."""
    stream = environ["wsgi.input"]
    while stream.read(_CHUNK):
        pass
    start_response("204 No Content", [])
    return [b""]


def flask_checkin_app() -> Flask:
    """A Flask app answering every check-in with the same assignment."""
    app = Flask(__name__)
    answer = task_assignments_pb2.CreateTaskAssignmentResponse()
    answer.task_assignment.population_name = "bench"
    answer.task_assignment.task_id = "1"
    answer.task_assignment.aggregation_id = "1"
    answer.task_assignment.assignment_id = "00000000-0000-0000-0000-000000000000"
    body = answer.SerializeToString()

    @app.post("/taskassignment/v1/population/<pop>:create-task-assignment")
    def checkin(pop: str) -> Response:
        req = task_assignments_pb2.CreateTaskAssignmentRequest()
        req.ParseFromString(request.get_data())
        return Response(body, status=201, content_type="application/x-protobuf")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    return app
