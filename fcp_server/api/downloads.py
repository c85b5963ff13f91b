"""Device downloads of the plan and client checkpoints, with ETag, caching and gzip.

ODP serves these through signed GCS/CDN URLs that devices fetch with `Accept-Encoding: gzip`
(odp-federated-compute.md section 2.2). Here the server serves them: the strong ETag is the
SHA-256 of the uncompressed bytes (the same value as Resource.sha256_checksum), a matching
If-None-Match answers 304, and the body is gzip-compressed when the client accepts it. The
blobs behind these URLs never change once published, so clients may cache them.
"""

import gzip
import hashlib

from flask import Blueprint, Response, request

from fcp_server import errors
from fcp_server.api.context import db_session, server
from fcp_server.api.devices import authenticate_device, limit_device_rate
from fcp_server.services import blob_paths, tasks
from fcp_server.storage.blobs import BlobNotFound

blueprint = Blueprint("downloads", __name__, url_prefix="/taskassignment/v1")
blueprint.before_request(authenticate_device)
blueprint.before_request(limit_device_rate)
CACHE_CONTROL = "private, max-age=3600"


def _serve(name: str) -> Response:
    ctx = server()
    limit = ctx.settings.max_artifact_bytes
    try:
        info = ctx.blobs.stat(name)
        etag = info.sha256 or hashlib.sha256(ctx.blobs.get(name, max_bytes=limit)).hexdigest()
        headers = {"ETag": f'"{etag}"', "Cache-Control": CACHE_CONTROL, "Vary": "Accept-Encoding"}
        if etag in request.if_none_match:
            return Response(status=304, headers=headers)
        gzip_ok = request.accept_encodings.quality("gzip") > 0
        if info.gzipped and gzip_ok:  # stored compressed: serve the stored bytes as they are
            data = ctx.blobs.get_raw(name, max_bytes=limit).data
            headers["Content-Encoding"] = "gzip"
        else:
            data = ctx.blobs.get(name, max_bytes=limit)
            if gzip_ok:
                headers["Content-Encoding"] = "gzip"
                data = gzip.compress(data, compresslevel=6, mtime=0)
    except BlobNotFound as e:
        raise errors.NotFound(f"resource {name} not found") from e
    return Response(data, status=200, headers=headers, content_type="application/octet-stream")


def _check(pop: str, task_id: int) -> None:
    """The population name is valid and the task exists: no blob is probed for anything else."""
    tasks.check_population(pop)
    session = db_session()
    with session.begin():
        tasks.get_task(session, pop, task_id)


@blueprint.get("/population/<pop>/task/<int:task_id>/client_only_plan")
def client_only_plan(pop: str, task_id: int) -> Response:
    """The task's serialized fcp.ClientOnlyPlan."""
    _check(pop, task_id)
    return _serve(blob_paths.artifact_blob(pop, task_id, "client_only_plan"))


@blueprint.get("/population/<pop>/task/<int:task_id>/aggregation/<int:result_id>/client_checkpoint")
def client_checkpoint(pop: str, task_id: int, result_id: int) -> Response:
    """The weights devices start from (safetensors)."""
    _check(pop, task_id)
    return _serve(blob_paths.client_checkpoint_blob(pop, task_id, result_id))
