"""Update uploads: every bad-upload case is a clear 4xx that changes nothing."""

import gzip
import struct

import numpy as np
import pytest
from sqlalchemy import select

from fcp_server import checkpoints
from fcp_server.protos import common_pb2
from fcp_server.services import blob_paths
from fcp_server.storage.models import Assignment, AssignmentStatus, Round, RoundStatus
from tests.integration.server import testkit
from tests.integration.server.testkit import POP, Api


def _state(ctx, assignment_id):
    with ctx.database.sessions() as session:
        a = session.get(Assignment, assignment_id)
        rnd = session.get(Round, a.round_pk)
        return a.status, rnd.reported_count, rnd.status


def _no_change(ctx, blobs, a):
    assert _state(ctx, a.proto.assignment_id) == (
        AssignmentStatus.LOCAL_COMPLETED,
        0,
        RoundStatus.COLLECTING,
    )
    assert not blobs.exists(blob_paths.gradient_blob(POP, 1, 1, a.proto.assignment_id))


def _raw(tensors):
    return checkpoints.encode_tensors(tensors)


def _good_tensors():
    return {
        "trainable/0": np.full((3, 1), 0.1, np.float32),
        "trainable/1": np.full((1,), 0.1, np.float32),
        "num_examples": np.array(5, np.int64),
        "metric/loss/0": np.array(1.0, np.float32),
        "metric/loss/1": np.array(5.0, np.float32),
    }


def _variant(**changes):
    tensors = _good_tensors()
    for name, value in changes.items():
        key = name.replace("__", "/")
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    return _raw(tensors)


BAD_UPDATES = {
    "missing tensor": _variant(trainable__1=None),
    "extra tensor": _raw({**_good_tensors(), "trainable/2": np.zeros(1, np.float32)}),
    "wrong name": _raw(
        {
            **{k: v for k, v in _good_tensors().items() if k != "trainable/0"},
            "weights/0": np.zeros((3, 1), np.float32),
        }
    ),
    "wrong shape": _variant(trainable__0=np.zeros((1, 3), np.float32)),
    "wrong dtype": _variant(trainable__0=np.zeros((3, 1), np.float64)),
    "nan": _variant(trainable__0=np.array([[np.nan], [0], [0]], np.float32)),
    "inf": _variant(trainable__1=np.array([np.inf], np.float32)),
    "negative examples": _variant(num_examples=np.array(-1, np.int64)),
    "not safetensors": b"\x80\x04\x95pickle-is-never-read",
    "lying header": struct.pack("<Q", 10**12) + b"{}",
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_invalid_update_is_400_and_changes_nothing(api, ctx, blobs, reported, case):
    a, location = reported

    resp = api.upload(location, BAD_UPDATES[case])

    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["status"] == "INVALID_ARGUMENT"
    _no_change(ctx, blobs, a)


def test_truncated_and_bomb_gzip(make_app, api, ctx, blobs, reported):
    a, location = reported
    body = gzip.compress(testkit.update_bytes())

    assert api.upload(location, b"", raw=body[:-12]).status_code == 400
    assert api.upload(location, b"", raw=body + b"junk").status_code == 400
    bomb = gzip.compress(b"\0" * (ctx.settings.max_upload_bytes + 1024))
    resp = api.upload(location, b"", raw=bomb)
    assert resp.status_code == 413
    _no_change(ctx, blobs, a)


def test_oversized_and_wrong_content_type_and_encoding(make_app, api, ctx, blobs, reported):
    a, location = reported
    small = make_app(max_upload_bytes=100)

    assert (
        Api(small.test_client())
        .upload(location, testkit.update_bytes(), compress=False)
        .status_code
        == 413
    )
    assert (
        api.upload(location, testkit.update_bytes(), content_type="application/json").status_code
        == 415
    )
    resp = api.client.put(
        location,
        data=testkit.update_bytes(),
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "br"},
    )
    assert resp.status_code == 415
    _no_change(ctx, blobs, a)


def test_upload_is_stored_counted_and_idempotent(api, ctx, blobs, reported):
    a, location = reported
    data = testkit.update_bytes()

    assert api.upload(location, data).status_code == 204
    assert api.upload(location, data, compress=False).status_code == 204  # identical retry
    assert api.upload(location, testkit.update_bytes(0.3)).status_code == 409  # different bytes

    assert _state(ctx, a.proto.assignment_id) == (
        AssignmentStatus.UPLOAD_COMPLETED,
        1,
        RoundStatus.COLLECTING,
    )
    assert blobs.get(blob_paths.gradient_blob(POP, 1, 1, a.proto.assignment_id)) == data


def test_foreign_or_other_round_ids_are_404(api, ctx, blobs, reported):
    a, location = reported
    other = "11111111-1111-4111-8111-111111111111"

    assert (
        api.upload(
            location.replace(a.proto.assignment_id, other), testkit.update_bytes()
        ).status_code
        == 404
    )
    assert (
        api.upload(
            location.replace("/aggregation/1/", "/aggregation/2/"), testkit.update_bytes()
        ).status_code
        == 404
    )
    assert (
        api.upload(
            location.replace(a.proto.assignment_id, "not-a-uuid"), testkit.update_bytes()
        ).status_code
        == 404
    )
    _no_change(ctx, blobs, a)


def test_upload_before_report_is_409(api, reported):
    fresh = api.assign()
    resp = api.upload(f"{fresh.base}:upload", testkit.update_bytes())
    assert resp.status_code == 409


def test_goal_reached_closes_collection_and_late_devices_are_refused(api, ctx, reported):
    first, location = reported
    second = api.assign()
    late = api.assign()
    late_location = api.report(late)[1].upload_instruction.upload_location
    assert api.upload(location, testkit.update_bytes()).status_code == 204
    second_location = api.report(second)[1].upload_instruction.upload_location
    assert api.upload(second_location, testkit.update_bytes()).status_code == 204

    # Exactly report_goal uploads: the round stopped collecting.
    with ctx.database.sessions() as session:
        rnd = session.scalar(select(Round))
        assert (rnd.status, rnd.reported_count) == (RoundStatus.AGGREGATING, 2)
    resp = api.upload(late_location, testkit.update_bytes())
    assert resp.status_code == 409
    assert "AGGREGATING" in resp.get_json()["error"]["message"]
    # A device reporting again now is told to come back later, without an upload instruction.
    resp, answer = api.report(late)
    assert resp.status_code == 200
    assert not answer.HasField("upload_instruction")
    assert answer.rejection_info.reason == common_pb2.RejectionReason.NO_TASK_AVAILABLE
    _, rejection = api.checkin()
    assert rejection.rejection_info.reason == common_pb2.RejectionReason.NO_TASK_AVAILABLE
    del first


def test_report_after_goal_gets_a_rejection_not_an_instruction(api, ctx):
    api.open_training(testkit.training_task(report_goal=1, max_size=3))
    slow = api.assign()
    api.contribute()  # another device fills the goal of 1

    resp, answer = api.report(slow)

    assert resp.status_code == 200
    assert not answer.HasField("upload_instruction")
    assert answer.rejection_info.reason == common_pb2.RejectionReason.NO_TASK_AVAILABLE
    assert answer.rejection_info.retry_window.delay_min.seconds == 60
    with ctx.database.sessions() as session:
        assert session.get(Assignment, slow.proto.assignment_id).status == AssignmentStatus.CANCELED
