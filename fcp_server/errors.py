"""The server's error tree and the one place that renders it as JSON.

Services raise these; the Flask handler registered in `register_error_handlers` turns any of
them into `{"error": {"code": <http status>, "status": "<NAME>", "message": "..."}}` (the
Google API error shape ODP's services answer with). Unexpected exceptions become a 500 with
a generic message; their details only go to the log.

FcpError                       500 INTERNAL
├── BadRequest                 400 INVALID_ARGUMENT   malformed body, bad field values
│   └── InvalidUpload          400 INVALID_ARGUMENT   update rejected (names/shapes/finite...)
├── Unauthenticated            401 UNAUTHENTICATED    missing or unknown credentials
├── PermissionDenied           403 PERMISSION_DENIED
├── NotFound                   404 NOT_FOUND          unknown task, round, assignment, blob
├── Conflict                   409 FAILED_PRECONDITION wrong state (round closed, task not CREATED)
│   └── AlreadyExists          409 ALREADY_EXISTS     one active task per population and kind
├── PayloadTooLarge            413 OUT_OF_RANGE       body above the configured bound
├── UnsupportedMediaType       415 INVALID_ARGUMENT   content type or encoding not accepted
└── RetryLater                 (abstract)             carries Retry-After
    ├── TooManyRequests        429 RESOURCE_EXHAUSTED rate limit hit
    └── ServiceUnavailable     503 UNAVAILABLE        database or blob store down

An unavailable dependency raised by the storage layer (`storage.availability`: a dropped
database connection, a blob store timeout) is answered as ServiceUnavailable, never as 500:
the request changed nothing it did not roll back, and the caller should retry.
"""

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from fcp_server.storage import availability

_LOG = logging.getLogger(__name__)


class FcpError(Exception):
    """Base of every error the server answers with; carries its HTTP status."""

    http_status: int = 500
    status_name: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(FcpError):
    """The request is malformed or a field has a bad value."""

    http_status = 400
    status_name = "INVALID_ARGUMENT"


class InvalidUpload(BadRequest):
    """A device update failed validation against the plan; nothing was stored."""


class Unauthenticated(FcpError):
    """Credentials are missing or not recognised."""

    http_status = 401
    status_name = "UNAUTHENTICATED"


class PermissionDenied(FcpError):
    """Credentials are valid but do not allow the call."""

    http_status = 403
    status_name = "PERMISSION_DENIED"


class NotFound(FcpError):
    """The task, round, assignment or artifact does not exist (or is not the caller's)."""

    http_status = 404
    status_name = "NOT_FOUND"


class Conflict(FcpError):
    """The entity is not in a state that allows the call (e.g. the round already closed)."""

    http_status = 409
    status_name = "FAILED_PRECONDITION"


class AlreadyExists(Conflict):
    """An entity that must be unique already exists (e.g. an active task of that kind)."""

    status_name = "ALREADY_EXISTS"


class PayloadTooLarge(FcpError):
    """The body exceeds the configured size bound."""

    http_status = 413
    status_name = "OUT_OF_RANGE"


class UnsupportedMediaType(FcpError):
    """The Content-Type or Content-Encoding is not one the endpoint accepts."""

    http_status = 415
    status_name = "INVALID_ARGUMENT"


class RetryLater(FcpError):
    """An error the caller should retry after `retry_after` seconds (sent as Retry-After)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class TooManyRequests(RetryLater):
    """The caller exceeded its request rate."""

    http_status = 429
    status_name = "RESOURCE_EXHAUSTED"


class ServiceUnavailable(RetryLater):
    """A dependency (database, blob store) is down."""

    http_status = 503
    status_name = "UNAVAILABLE"


# What a 503 for an unavailable dependency asks the caller to wait (devices also back off).
DEPENDENCY_RETRY_AFTER_SECONDS = 5


def error_body(code: int, status: str, message: str) -> dict[str, dict[str, int | str]]:
    """The JSON error document every failing endpoint answers with."""
    return {"error": {"code": code, "status": status, "message": message}}


def _respond(error: FcpError) -> tuple[Response, int]:
    response = jsonify(error_body(error.http_status, error.status_name, error.message))
    if isinstance(error, RetryLater):
        response.headers["Retry-After"] = str(error.retry_after)  # RFC 9110 section 10.2.3
    return response, error.http_status


def _render_fcp_error(error: FcpError) -> tuple[Response, int]:
    if error.http_status >= 500:
        _LOG.error("server error: %s", error.message)
    return _respond(error)


def _render_http_exception(error: HTTPException) -> tuple[Response, int]:
    code = error.code or 500
    name = (error.name or "ERROR").upper().replace(" ", "_")
    return jsonify(error_body(code, name, error.description or name)), code


def _render_unavailable(error: Exception) -> tuple[Response, int]:
    dependency = availability.unavailable_dependency(error) or "a dependency"
    _LOG.warning("request failed, the %s is unavailable: %s", dependency, error)
    unavailable = ServiceUnavailable(
        f"the {dependency} is temporarily unavailable; retry the request later",
        retry_after=DEPENDENCY_RETRY_AFTER_SECONDS,
    )
    return _respond(unavailable)


def _render_unexpected(error: Exception) -> tuple[Response, int]:
    # The one catch-all: log the traceback, never leak internals to the caller.
    _LOG.exception("unhandled error: %s", type(error).__name__)
    return jsonify(error_body(500, "INTERNAL", "internal server error")), 500


def register_error_handlers(app: Flask) -> None:
    """Makes every error, ours or Werkzeug's, answer with the JSON error document."""
    app.register_error_handler(FcpError, _render_fcp_error)
    app.register_error_handler(HTTPException, _render_http_exception)
    for dependency_error in availability.DEPENDENCY_ERRORS:
        app.register_error_handler(dependency_error, _render_unavailable)
    app.register_error_handler(Exception, _render_unexpected)
