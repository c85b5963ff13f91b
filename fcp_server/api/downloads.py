"""Device downloads of the plan and client checkpoints, with ETag, caching and gzip.

ODP serves these through signed GCS/CDN URLs that devices fetch with `Accept-Encoding: gzip`
(odp-federated-compute.md section 2.2). Here the server serves them: the strong ETag is the
SHA-256 of the uncompressed bytes (the same value as Resource.sha256_checksum), a matching
If-None-Match answers 304, and the body is gzip-compressed when the client accepts it. The
blobs behind these URLs never change once published, so clients may cache them, and so does
each server process (`services.download_cache`): the task lookup, the blob's metadata and the
stored bytes of small blobs are kept once the task is past CREATED.
"""

import dataclasses
import gzip
import hashlib

from flask import Blueprint, Response, request

from fcp_server import errors
from fcp_server.api.context import db_session, server
from fcp_server.api.devices import authenticate_device, limit_device_rate
from fcp_server.services import blob_paths, tasks
from fcp_server.services.download_cache import CachedBlob, PublishedBlobs
from fcp_server.storage.blobs import BlobNotFound
from fcp_server.storage.models import TaskStatus

blueprint = Blueprint("downloads", __name__, url_prefix="/taskassignment/v1")
blueprint.before_request(authenticate_device)
blueprint.before_request(limit_device_rate)
CACHE_CONTROL = "private, max-age=3600"


def _metadata(name: str, cache: PublishedBlobs | None) -> CachedBlob:
    """The blob's ETag and encoding, from `cache` when there (added when not)."""
    cached = cache.get(name) if cache is not None else None
    if cached is None:
        ctx = server()
        info = ctx.blobs.stat(name)
        limit = ctx.settings.max_artifact_bytes
        etag = info.sha256 or hashlib.sha256(ctx.blobs.get(name, max_bytes=limit)).hexdigest()
        cached = CachedBlob(sha256=etag, gzipped=info.gzipped, stored=None)
        if cache is not None:
            cache.put(name, cached)
    return cached


def _stored(name: str, blob: CachedBlob, cache: PublishedBlobs | None) -> bytes:
    """The blob's stored bytes, from `cache` when there (added when small)."""
    if blob.stored is not None:
        return blob.stored
    ctx = server()
    data = ctx.blobs.get_raw(name, max_bytes=ctx.settings.max_artifact_bytes).data
    if cache is not None:
        cache.put(name, dataclasses.replace(blob, stored=data))
    return data


def _serve(name: str, settled: bool) -> Response:
    """Serves blob `name`; `settled`: its task is past CREATED, so the blob may be cached."""
    cache = server().published_blobs if settled else None
    try:
        blob = _metadata(name, cache)
        headers = {
            "ETag": f'"{blob.sha256}"',
            "Cache-Control": CACHE_CONTROL,
            "Vary": "Accept-Encoding",
        }
        if blob.sha256 in request.if_none_match:
            return Response(status=304, headers=headers)
        gzip_ok = request.accept_encodings.quality("gzip") > 0
        if blob.gzipped and gzip_ok:  # stored compressed: serve the stored bytes as they are
            data = _stored(name, blob, cache)
            headers["Content-Encoding"] = "gzip"
        else:
            data = server().blobs.get(name, max_bytes=server().settings.max_artifact_bytes)
            if gzip_ok:
                headers["Content-Encoding"] = "gzip"
                data = gzip.compress(data, compresslevel=6, mtime=0)
    except BlobNotFound as e:
        raise errors.NotFound(f"resource {name} not found") from e
    return Response(data, status=200, headers=headers, content_type="application/octet-stream")


def _check(pop: str, task_id: int) -> tuple[bool, str | None]:
    """The population name is valid and the task exists: no blob is probed for anything else.

    Returns whether the task is past CREATED (its blobs no longer change) and, while it is
    CREATED, the SHA-256 of its latest client plan upload (None if none). A task this process
    has found past CREATED is not looked up again (`download_cache`: tasks are never deleted);
    any other is, on every request.
    """
    tasks.check_population(pop)
    known = server().known_tasks
    if (pop, task_id) in known:
        return True, None
    session = db_session()
    with session.begin():
        task = tasks.get_task(session, pop, task_id)
        settled, plan_sha256 = task.status != TaskStatus.CREATED, task.client_plan_sha256
    if settled:
        known.add(pop, task_id)
        return True, None
    return False, plan_sha256


@blueprint.get("/population/<pop>/task/<int:task_id>/client_only_plan")
def client_only_plan(pop: str, task_id: int) -> Response:
    """The task's serialized fcp.ClientOnlyPlan."""
    settled, uploaded = _check(pop, task_id)
    if uploaded is not None:  # CREATED: the latest upload, published only when the task opens
        return _serve(
            blob_paths.uploaded_artifact_blob(pop, task_id, "client_only_plan", uploaded), False
        )
    return _serve(blob_paths.artifact_blob(pop, task_id, "client_only_plan"), settled)


@blueprint.get("/population/<pop>/task/<int:task_id>/aggregation/<int:result_id>/client_checkpoint")
def client_checkpoint(pop: str, task_id: int, result_id: int) -> Response:
    """The weights devices start from (safetensors)."""
    settled, _ = _check(pop, task_id)
    return _serve(blob_paths.client_checkpoint_blob(pop, task_id, result_id), settled)
