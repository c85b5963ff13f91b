"""Device-facing HTTP API: check-in, report-result, update upload and resource downloads.

Paths and messages are ODP's TaskAssignmentController (odp-federated-compute.md section 2.2):
check-in answers 201 with a TaskAssignment or 200 with a RejectionInfo and retry window;
report-result answers an UploadInstruction for COMPLETED. Uploads and downloads go to this
server instead of signed GCS URLs. When device auth is on, every call needs a valid
`odp-authorization-key`; a check-in without one gets 401 with an UNAUTHENTICATED rejection.
The token's hash identifies the device: it holds at most one assignment per round and only it
may report or upload for that assignment. With `FCP_RATE_LIMIT_REQUESTS` set, each token (or
client address without device auth) gets that many calls per window, then 429 + Retry-After.
"""

from flask import Blueprint, Response, g, request
from google.protobuf import duration_pb2

from fcp_server import errors, fault_points
from fcp_server.api import bodies, wire
from fcp_server.api.context import db_session, server
from fcp_server.protos import common_pb2, task_assignments_pb2
from fcp_server.services import auth, blob_paths, checkin, rate_limits, reports, tasks, uploads
from fcp_server.services.assignment_protos import fill_task_assignment

blueprint = Blueprint("devices", __name__, url_prefix="/taskassignment/v1")
_ASSIGNMENT = "/population/<pop>/task/<int:task_id>/aggregation/<int:round_id>/task-assignment"
_GZIP = common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP


def authenticate_device() -> Response | None:
    """Rejects calls without a valid device token when device auth is on."""
    ctx = server()
    if not ctx.settings.device_auth:
        return None
    session = db_session()
    token = request.headers.get(auth.DEVICE_TOKEN_HEADER)
    with session.begin():
        ok = ctx.authenticator.authenticate(session, token, ctx.clock.now())
    if ok:
        if token:  # the device's identity: one assignment per round, reports only its own
            g.fcp_device_key = auth.token_digest(token)
        return None
    if request.endpoint == "devices.create_task_assignment":
        answer = task_assignments_pb2.CreateTaskAssignmentResponse()
        answer.rejection_info.reason = common_pb2.RejectionReason.UNAUTHENTICATED
        return wire.respond(answer, status=401)
    raise errors.Unauthenticated(f"a valid {auth.DEVICE_TOKEN_HEADER} header is required")


def device_key() -> str | None:
    """SHA-256 of the calling device's token once authenticated; None without device auth."""
    key: str | None = g.get("fcp_device_key")
    return key


def limit_device_rate() -> None:
    """Counts the call against the caller's budget (after authentication); 429 when spent."""
    ctx = server()
    limit, window = ctx.settings.rate_limit_requests, ctx.settings.rate_limit_window_seconds
    if limit == 0:
        return
    key = device_key()
    caller = (
        rate_limits.device_caller(key) if key else rate_limits.address_caller(request.remote_addr)
    )
    session = db_session()
    with session.begin():
        decision = rate_limits.hit(
            session, caller, now=ctx.clock.now(), limit=limit, window_seconds=window
        )
    if not decision.allowed:
        raise errors.TooManyRequests(
            f"rate limit of {limit} requests per {window} s exceeded; "
            f"retry after {decision.retry_after} s",
            retry_after=decision.retry_after,
        )


def check_population() -> None:
    """400 for a malformed population name, before it reaches a query or a blob name.

    PostgreSQL refuses NUL in text, so such a name would otherwise end in a 500.
    """
    pop = (request.view_args or {}).get("pop")
    if isinstance(pop, str):
        tasks.check_population(pop)


def admit_device() -> Response | None:
    """Every device call's checks, in order: the population name, the token, the rate limit.

    One hook instead of three: Flask's per-hook dispatch cost more than the checks themselves
    on a check-in without device auth or rate limits.
    """
    check_population()
    refused = authenticate_device()
    if refused is not None:
        return refused
    limit_device_rate()
    return None


blueprint.before_request(admit_device)


def rejection_proto(rejection: checkin.Rejection) -> common_pb2.RejectionInfo:
    """RejectionInfo with its retry window."""
    low, high = rejection.retry_seconds
    return common_pb2.RejectionInfo(
        reason=rejection.reason,
        retry_window=common_pb2.RetryWindow(
            delay_min=duration_pb2.Duration(seconds=low),
            delay_max=duration_pb2.Duration(seconds=high),
        ),
    )


@blueprint.post("/population/<pop>:create-task-assignment")
def create_task_assignment(pop: str) -> Response:
    """Check-in: 201 + TaskAssignment, or 200 + RejectionInfo."""
    body = wire.parse(task_assignments_pb2.CreateTaskAssignmentRequest)
    ctx = server()
    gzip_ok = _GZIP in body.resource_capabilities.supported_compression_formats
    key = device_key()
    with checkin.transaction(ctx.database, key) as conn:
        outcome = checkin.check_in(
            conn=conn,
            pop=pop,
            version_code=body.client_version.version_code,
            rng=ctx.rng_factory,
            now=ctx.clock.now(),
            device_key=key,
            cache=ctx.round_cache,
        )
        if isinstance(outcome, checkin.Assigned):
            fault_points.hit("checkin.before_commit")
    # The answer is built after the commit: on SQLite the transaction holds the write lock.
    answer = task_assignments_pb2.CreateTaskAssignmentResponse()
    if isinstance(outcome, checkin.Rejection):
        answer.rejection_info.CopyFrom(rejection_proto(outcome))
        result = outcome.rating.name
    else:
        fault_points.hit("checkin.after_commit")
        fill_task_assignment(
            answer.task_assignment,
            outcome,
            gzip=gzip_ok,
            local_timeout=ctx.settings.local_compute_timeout_seconds,
        )
        result = "SUCCESS"
    ctx.metrics.checkins.inc(pop, result)
    return wire.respond(answer, status=201 if result == "SUCCESS" else 200)


@blueprint.put(f"{_ASSIGNMENT}/<assignment_id>:report-result")
def report_result(pop: str, task_id: int, round_id: int, assignment_id: str) -> Response:
    """Report-result: UploadInstruction for COMPLETED, rejection if the round moved on."""
    body = wire.parse(task_assignments_pb2.ReportResultRequest)
    ctx, session = server(), db_session()
    with session.begin():
        located = reports.locate(session, pop, task_id, round_id, assignment_id, device_key())
        outcome = reports.report_result(
            session=session, located=located, result=body.result, now=ctx.clock.now()
        )
    if outcome.upload:
        fault_points.hit("report.after_commit")
    answer = task_assignments_pb2.ReportResultResponse()
    if outcome.rejection is not None:
        answer.rejection_info.CopyFrom(rejection_proto(outcome.rejection))
    elif outcome.upload:
        instruction = answer.upload_instruction
        instruction.upload_location = blob_paths.upload_url(pop, task_id, round_id, assignment_id)
        instruction.extra_request_headers["Content-Type"] = "application/octet-stream"
        instruction.max_upload_bytes = ctx.settings.max_upload_bytes
        if _GZIP in body.resource_capabilities.supported_compression_formats:
            instruction.extra_request_headers["Content-Encoding"] = "gzip"
            instruction.compression_format = _GZIP
    name = task_assignments_pb2.ReportResultRequest.Result.Name(body.result)
    ctx.metrics.reports.inc(pop, name if outcome.rejection is None else f"{name}_REJECTED")
    return wire.respond(answer)


@blueprint.put(f"{_ASSIGNMENT}/<assignment_id>:upload")
def upload(pop: str, task_id: int, round_id: int, assignment_id: str) -> Response:
    """Receives a device's update (raw or gzip safetensors); 204 when accepted."""
    ctx = server()
    if not blob_paths.is_valid_assignment_id(assignment_id):
        raise errors.NotFound(f"assignment {assignment_id[:40]!r} not found")
    media = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if media != "application/octet-stream":
        ctx.metrics.uploads.inc(pop, "unsupported_media_type")
        raise errors.UnsupportedMediaType(
            f"upload Content-Type must be application/octet-stream, got {media!r}"
        )
    limit = ctx.settings.max_upload_bytes
    try:
        result = uploads.accept_upload(
            database=ctx.database,
            blobs=ctx.blobs,
            plans=ctx.plans,
            ids=(pop, task_id, round_id, assignment_id),
            body=bodies.read_update(limit),
            content_encoding=request.headers.get("Content-Encoding", ""),
            now=ctx.clock.now(),
            max_bytes=limit,
            device_key=device_key(),
        )
    except errors.FcpError as e:
        ctx.metrics.uploads.inc(pop, type(e).__name__)
        raise
    ctx.metrics.uploads.inc(pop, "accepted" if result.counted else "duplicate")
    return Response(status=204)
