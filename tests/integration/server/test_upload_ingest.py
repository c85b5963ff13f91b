"""Upload ingest: one SHA-256 of the update serves both its record and its blob, an assignment
that moves while the blob is written is answered from its fresh state, and gzip bodies of
several MB inflate whole and bounded."""

import gzip
import hashlib
import os

import pytest
from sqlalchemy import update

from fcp_server import errors, fault_points
from fcp_server.services import blob_paths, compression
from fcp_server.storage.models import Assignment, AssignmentStatus, Round
from tests.integration.server import testkit
from tests.integration.server.testkit import POP


def _blob(a):
    return blob_paths.gradient_blob(POP, 1, 1, a.proto.assignment_id)


def _recorded(ctx, assignment_id):
    with ctx.database.sessions() as session:
        a = session.get(Assignment, assignment_id)
        return a.status, a.upload_sha256, session.get(Round, a.round_pk).reported_count


@pytest.mark.parametrize("compress", [False, True])
def test_the_update_is_hashed_once_for_its_record_and_its_blob(
    api, ctx, blobs, reported, monkeypatch, compress
):
    a, location = reported
    data = testkit.update_bytes()
    real_sha256 = hashlib.sha256
    hashed_sizes = []

    def counting_sha256(*args, **kwargs):
        hashed_sizes.append(len(args[0]) if args else 0)
        return real_sha256(*args, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counting_sha256)
    resp = api.upload(location, data, compress=compress)
    monkeypatch.undo()

    assert resp.status_code == 204, resp.get_data(as_text=True)
    assert hashed_sizes.count(len(data)) == 1
    digest = hashlib.sha256(data).hexdigest()
    assert _recorded(ctx, a.proto.assignment_id) == (AssignmentStatus.UPLOAD_COMPLETED, digest, 1)
    assert blobs.stat(_blob(a)).sha256 == digest
    assert blobs.get(_blob(a)) == data


def _move_while_storing(monkeypatch, ctx, assignment_id, **values):
    """Changes the assignment's row between the blob write and the counting transaction."""
    real_hit = fault_points.hit

    def hit(name):
        if name == "upload.after_blob_write":
            with ctx.database.sessions() as session, session.begin():
                session.execute(
                    update(Assignment).where(Assignment.id == assignment_id).values(**values)
                )
        real_hit(name)

    monkeypatch.setattr(fault_points, "hit", hit)


def test_a_concurrent_identical_upload_is_acknowledged_not_counted(
    api, ctx, blobs, reported, monkeypatch
):
    a, location = reported
    data = testkit.update_bytes()
    digest = hashlib.sha256(data).hexdigest()
    _move_while_storing(
        monkeypatch,
        ctx,
        a.proto.assignment_id,
        status=AssignmentStatus.UPLOAD_COMPLETED,
        upload_sha256=digest,
    )

    assert api.upload(location, data).status_code == 204

    assert _recorded(ctx, a.proto.assignment_id) == (AssignmentStatus.UPLOAD_COMPLETED, digest, 0)
    assert blobs.get(_blob(a)) == data


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"status": AssignmentStatus.UPLOAD_COMPLETED, "upload_sha256": "0" * 64},
            "a different update",
        ),
        ({"status": AssignmentStatus.UPLOAD_TIMEOUT}, "assignment is UPLOAD_TIMEOUT"),
    ],
)
def test_an_assignment_moved_while_storing_is_refused_and_its_blob_removed(
    api, ctx, blobs, reported, monkeypatch, values, message
):
    a, location = reported
    _move_while_storing(monkeypatch, ctx, a.proto.assignment_id, **values)

    resp = api.upload(location, testkit.update_bytes())

    assert resp.status_code == 409
    assert message in resp.get_json()["error"]["message"]
    assert _recorded(ctx, a.proto.assignment_id)[2] == 0
    assert not blobs.exists(_blob(a))


def test_a_multi_megabyte_gzip_body_inflates_whole_and_bounded():
    data = os.urandom(3 << 20) + bytes(5 << 20)  # incompressible, then very compressible
    body = gzip.compress(data, compresslevel=6)

    assert compression.gunzip_bounded(body, len(data)) == data
    with pytest.raises(errors.PayloadTooLarge):
        compression.gunzip_bounded(body, len(data) - 1)
    with pytest.raises(errors.InvalidUpload, match="truncated"):
        compression.gunzip_bounded(body[: len(body) // 2], len(data))
