"""Artifact uploads racing a task's open: an open task's artifacts never change.

Devices download an open task's plan and the download caches keep it (`download_cache`), so
once a task is OPEN its client plan, server plan and initial checkpoint must be the bytes the
open validated, and the task row's SHA-256 columns (the devices' checksums, the plan cache's
key) must name those bytes. Uploads and the open both decide with compare-and-swap UPDATEs.

The interleavings inside one transaction need PostgreSQL: SQLite serialises writers
(BEGIN IMMEDIATE), so there one request cannot run inside another's transaction. The blob
store is not transactional on either database, so an upload whose transaction fails after its
blob write is tested on both.
"""

import hashlib

import pytest
from sqlalchemy import select

from fcp_server import errors
from fcp_server.protos import plan_pb2
from fcp_server.services import artifacts, blob_paths, task_open
from fcp_server.storage.blobs import BlobBackendError
from fcp_server.storage.models import Task, TaskStatus
from tests.integration.server import testkit
from tests.integration.server.testkit import POP


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plan(tflite: bytes, *, rows: int = 3) -> bytes:
    """A valid client plan; `rows` != 3 gives a model the server plan does not describe."""
    plan = testkit.client_plan()
    plan.tflite_model = tflite
    if rows != 3:
        plan.model.trainable[0].shape[:] = [rows, 1]
    return plan.SerializeToString()


PLAN_A = _plan(b"plan-a")
PLAN_B = _plan(b"plan-b")
PLAN_OTHER_MODEL = _plan(b"plan-c", rows=4)


def _created(api) -> int:
    """A CREATED training task with every artifact uploaded (client plan PLAN_A)."""
    task = api.created(testkit.training_task()).task
    api.upload_artifacts(
        task, testkit.server_plan(), testkit.client_plan(), testkit.initial_checkpoint()
    )
    assert api.put(task.client_only_plan_url[0], PLAN_A).status_code == 204
    return task.task_id


def _row(ctx, task_id: int) -> Task:
    with ctx.database.sessions() as session, session.begin():
        row = session.scalar(select(Task).where(Task.task_id == task_id))
        assert row is not None
        return row


def _served_plan(api, task_id: int) -> bytes:
    resp = api.client.get(
        blob_paths.plan_download_url(POP, task_id), headers={"Accept-Encoding": "identity"}
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return bytes(resp.data)


def _open(ctx, task_id: int) -> None:
    with ctx.database.sessions() as session, session.begin():
        task_open.open_task(
            session=session,
            blobs=ctx.blobs,
            pop=POP,
            task_id=task_id,
            now=ctx.clock.now(),
            settings=ctx.settings,
        )


def _upload_plan(ctx, task_id: int, data: bytes) -> None:
    with ctx.database.sessions() as session, session.begin():
        artifacts.put_artifact(
            session=session,
            blobs=ctx.blobs,
            pop=POP,
            task_id=task_id,
            kind="client_only_plan",
            data=data,
            max_bytes=ctx.settings.max_artifact_bytes,
        )


def _needs_postgres(ctx) -> None:
    if ctx.database.engine.dialect.name != "postgresql":
        pytest.skip("needs two transactions at once: SQLite serialises writers")


def test_an_upload_failing_after_its_blob_write_changes_nothing_an_open_publishes(
    api, ctx, monkeypatch
):
    task_id = _created(api)
    real_put = ctx.blobs.put

    def put_then_fail(name, data, **kwargs):
        # The write lands, then the call fails (a GCS request that timed out after the object
        # was committed): the upload's transaction rolls back.
        real_put(name, data, **kwargs)
        raise BlobBackendError("timed out after the write")

    monkeypatch.setattr(ctx.blobs, "put", put_then_fail)
    assert (
        api.put(blob_paths.artifact_url(POP, task_id, "client_only_plan"), PLAN_B).status_code
        == 503
    )
    monkeypatch.undo()

    assert api.task_call(POP, task_id, "open").status_code == 200
    row = _row(ctx, task_id)
    assert row.client_plan_sha256 == _sha(PLAN_A)
    assert _served_plan(api, task_id) == PLAN_A


def test_an_open_inside_an_uploads_window_makes_the_upload_fail(api, ctx, monkeypatch):
    _needs_postgres(ctx)
    task_id = _created(api)
    parse = artifacts.parse_client_plan

    def open_meanwhile(data: bytes, task: Task) -> plan_pb2.ClientOnlyPlan:
        # After the upload read its task as CREATED, before it writes: the task opens.
        monkeypatch.setattr(artifacts, "parse_client_plan", parse)
        _open(ctx, task_id)
        return parse(data, task)

    monkeypatch.setattr(artifacts, "parse_client_plan", open_meanwhile)
    with pytest.raises(errors.Conflict):
        _upload_plan(ctx, task_id, PLAN_B)

    row = _row(ctx, task_id)
    assert row.status == TaskStatus.OPEN
    assert row.client_plan_sha256 == _sha(PLAN_A)
    assert _served_plan(api, task_id) == PLAN_A
    assert ctx.blobs.get(blob_paths.artifact_blob(POP, task_id, "client_only_plan")) == PLAN_A


def test_an_upload_inside_an_opens_window_makes_the_open_fail(api, ctx, monkeypatch):
    _needs_postgres(ctx)
    task_id = _created(api)
    check_budget = task_open._check_budget_allows_a_round

    def upload_meanwhile(plan: plan_pb2.ServerPlan, total_iteration: int) -> None:
        # After the open validated the artifacts, before it moves the task: a client plan of
        # another model replaces the validated one.
        monkeypatch.setattr(task_open, "_check_budget_allows_a_round", check_budget)
        _upload_plan(ctx, task_id, PLAN_OTHER_MODEL)
        check_budget(plan, total_iteration)

    monkeypatch.setattr(task_open, "_check_budget_allows_a_round", upload_meanwhile)
    with pytest.raises(errors.Conflict):
        _open(ctx, task_id)

    row = _row(ctx, task_id)
    assert row.status == TaskStatus.CREATED
    assert row.client_plan_sha256 == _sha(PLAN_OTHER_MODEL)
    # Opened again, the open sees the plan it would serve, and refuses it.
    resp = api.task_call(POP, task_id, "open")
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert "model" in resp.get_data(as_text=True)


def test_an_open_uses_only_the_bytes_the_row_records(api, ctx):
    task_id = _created(api)
    uploaded = blob_paths.uploaded_artifact_blob(POP, task_id, "client_only_plan", _sha(PLAN_A))
    published = blob_paths.artifact_blob(POP, task_id, "client_only_plan")
    ctx.blobs.delete(uploaded)
    ctx.blobs.put(published, PLAN_B, gzip=True)  # not the recorded upload
    resp = api.task_call(POP, task_id, "open")
    assert resp.status_code == 409, resp.get_data(as_text=True)
    assert "upload it again" in resp.get_data(as_text=True)
    assert _row(ctx, task_id).status == TaskStatus.CREATED

    # A task uploaded before uploads had names of their own: its recorded bytes still open it.
    ctx.blobs.put(published, PLAN_A, gzip=True)
    assert api.task_call(POP, task_id, "open").status_code == 200
    assert _served_plan(api, task_id) == PLAN_A
