"""The task-builder HTTP service: POST a BuildTaskRequest, get a BuildTaskResponse.

The endpoints of ODP's `task_builder_wsgi.py` (odp-federated-compute.md section 1.3) as a Flask
app factory served by gunicorn (port 5000): `/taskbuilder/v1:build-task-group` (build and
register with the FCP server named by the settings), `/taskbuilder/v1:build-artifacts` (build
only), `/ready`, `/healthz`. Bodies are binary protobuf, or proto3 JSON when the Content-Type is
application/json; replies use the request's format. Unlike the reference, failures answer with
the error's HTTP status (task_builder.errors) AND carry `error_info`, never a bare 500.
A request's warm start may only read the service's own configured blob store
(FCP_WARM_START_BLOB_URL): the service never opens a URL a client sent.
"""

import dataclasses
import logging
import os
from collections.abc import Mapping

import httpx
from flask import Flask, Response, request
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from werkzeug.exceptions import HTTPException

from fcp_server.protos import task_builder_pb2
from task_builder import builder, registration, tff_runtime
from task_builder.errors import (
    BuildRequestError,
    RequestTooLargeError,
    TaskBuilderError,
    UnsupportedMediaError,
)

_LOG = logging.getLogger(__name__)
_PROTO = "application/x-protobuf"
_JSON = "application/json"
_BINARY_TYPES = frozenset({"", _PROTO, "application/octet-stream", "application/protobuf"})
_SETTINGS_KEY = "task_builder"


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """Deployment settings of the task-builder service (env vars: see `from_env`)."""

    # The FCP server whose task-management API registers the built tasks.
    server_url: str = "http://localhost:8080"
    # The server's admin API key (x-api-key); None when the server's admin API is open.
    admin_api_key: str | None = None
    # Largest BuildTaskRequest accepted, bytes (a TaskConfig is small; the model is by URI).
    max_request_bytes: int = 4 * 1024 * 1024
    # Timeout of each call to the server, seconds (artifact uploads can be large).
    server_timeout_seconds: float = 300.0
    # The FCP server's blob store that warm starts read (file:// or gs://); None refuses them.
    warm_start_blob_url: str | None = None

    def __post_init__(self) -> None:
        if not self.server_url.startswith(("http://", "https://")):
            raise ValueError(f"FCP_SERVER_URL must be an http(s) URL, got {self.server_url!r}")
        if self.max_request_bytes <= 0 or self.server_timeout_seconds <= 0:
            raise ValueError("max_request_bytes and server_timeout_seconds must be positive")
        url = self.warm_start_blob_url
        if url is not None and not url.startswith(("file://", "gs://")):
            raise ValueError(f"FCP_WARM_START_BLOB_URL must be a file:// or gs:// URL, got {url!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ServiceSettings":
        """Reads FCP_SERVER_URL, FCP_ADMIN_API_KEY, FCP_WARM_START_BLOB_URL (defaults otherwise)."""
        source = os.environ if env is None else env
        return cls(
            server_url=source.get("FCP_SERVER_URL", cls.server_url),
            admin_api_key=source.get("FCP_ADMIN_API_KEY") or None,
            warm_start_blob_url=source.get("FCP_WARM_START_BLOB_URL") or None,
        )


def _media_type() -> str:
    return (request.content_type or "").split(";")[0].strip().lower()


def _read_body(limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLargeError(f"the request body is larger than {limit} bytes")
    data = request.stream.read(limit + 1)
    if len(data) > limit:
        raise RequestTooLargeError(f"the request body is larger than {limit} bytes")
    return data


def parse_build_request(body: bytes, media_type: str) -> task_builder_pb2.BuildTaskRequest:
    """Decodes a BuildTaskRequest from binary protobuf or proto3 JSON.

    Raises:
      BuildRequestError: the body does not decode (UnsupportedMediaError for other types).
    """
    message = task_builder_pb2.BuildTaskRequest()
    if media_type == _JSON:
        try:
            json_format.Parse(body.decode("utf-8"), message)
        except (UnicodeDecodeError, json_format.ParseError) as e:
            raise BuildRequestError(f"the body is not a JSON BuildTaskRequest: {e}") from e
        return message
    if media_type not in _BINARY_TYPES:
        raise UnsupportedMediaError(
            f"unsupported Content-Type {media_type!r}: use {_PROTO} or {_JSON}"
        )
    try:
        message.ParseFromString(body)
    except DecodeError as e:
        raise BuildRequestError(f"the body is not a binary BuildTaskRequest: {e}") from e
    return message


def resolve_warm_start(
    build_request: task_builder_pb2.BuildTaskRequest, configured_url: str | None
) -> None:
    """Points a requested warm start at the configured store, in place (no-op without one).

    A client must not make the service read an arbitrary URL (a local path, another bucket),
    so the request's blob_url may only be empty or name the configured store.

    Raises:
      BuildRequestError: no store is configured, or the request names another one.
    """
    if not build_request.HasField("warm_start"):
        return
    if configured_url is None:
        raise BuildRequestError(
            "warm start is not enabled on this task builder (FCP_WARM_START_BLOB_URL is unset)"
        )
    warm_start = build_request.warm_start
    if warm_start.blob_url and warm_start.blob_url.rstrip("/") != configured_url.rstrip("/"):
        raise BuildRequestError(
            "warm_start.blob_url must be empty or this task builder's configured blob store; "
            "the service reads no other URL"
        )
    warm_start.blob_url = configured_url


def _reply(message: task_builder_pb2.BuildTaskResponse, status: int) -> Response:
    if _media_type() == _JSON:
        return Response(json_format.MessageToJson(message), status=status, mimetype=_JSON)
    return Response(message.SerializeToString(), status=status, mimetype=_PROTO)


def _build(app: Flask, *, artifact_only: bool, transport: httpx.BaseTransport | None) -> Response:
    settings: ServiceSettings = app.extensions[_SETTINGS_KEY]
    try:
        build_request = parse_build_request(_read_body(settings.max_request_bytes), _media_type())
        resolve_warm_start(build_request, settings.warm_start_blob_url)
    except BuildRequestError as e:
        return _reply(builder.error_response(e), e.http_status)
    client = registration.TaskManagementClient(
        settings.server_url,
        api_key=settings.admin_api_key,
        transport=transport,
        timeout=settings.server_timeout_seconds,
    )
    with client:
        response, status = builder.build_response(
            build_request, artifact_only=artifact_only, server=None if artifact_only else client
        )
    return _reply(response, status)


def _register_routes(app: Flask, transport: httpx.BaseTransport | None) -> None:
    @app.post("/taskbuilder/v1:build-task-group")
    def build_task_group() -> Response:
        return _build(app, artifact_only=False, transport=transport)

    @app.post("/taskbuilder/v1:build-artifacts")
    def build_artifacts() -> Response:
        return _build(app, artifact_only=True, transport=transport)

    @app.get("/ready")
    def ready() -> Response:
        return Response("ready\n", mimetype="text/plain")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        # Routing errors (404, 405) keep their status; build endpoints still get error_info.
        info = BuildRequestError(error.description or error.name)
        return _reply(builder.error_response(info), error.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        # The one broad handler: a bug must still answer with error_info, details in the log.
        _LOG.exception("unexpected error while building")
        info = TaskBuilderError(f"internal error ({type(error).__name__}); see the service log")
        return _reply(builder.error_response(info), 500)


def create_app(
    settings: ServiceSettings | None = None, *, server_transport: httpx.BaseTransport | None = None
) -> Flask:
    """Builds the task-builder Flask app.

    Args:
      settings: deployment settings; read from the environment when None.
      server_transport: an httpx transport to the FCP server (tests pass a WSGITransport of
        the server app); None uses the network.

    Returns:
      The Flask app (serve with gunicorn, e.g. `task_builder` / service_cli).
    """
    # TFF computations leave a worker_binary child; end it when this process exits.
    tff_runtime.install_reaper()
    app = Flask(__name__)
    app.extensions[_SETTINGS_KEY] = settings or ServiceSettings.from_env()
    _register_routes(app, server_transport)
    _register_error_handlers(app)
    return app
