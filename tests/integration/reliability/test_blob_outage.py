"""Blob store faults (issue 9, item 5): the GCS emulator cut off, hung and slow.

The server's `GcsBlobStore` talks to the GCS API emulator through `TcpProxy`, so the test can
cut the path (connections reset and refused), stall it (requests hang until the store's
timeout) or slow it. While the blob store is down, device requests that need it answer 503
with Retry-After and change nothing; the round close waits without spending its bounded
attempts; when the store returns, the same upload is accepted once and the round completes.
"""

import dataclasses
import hashlib
import json
import uuid

import pytest
from sqlalchemy import select

from fcp_server.app import create_app, worker_deps
from fcp_server.services import blob_paths
from fcp_server.storage.blobs import make_blob_store
from fcp_server.storage.models import Assignment, AssignmentStatus, Round, RoundStatus, Task
from fcp_server.worker import Worker
from tests.integration.reliability.tcp_proxy import TcpProxy
from tests.integration.server import testkit
from tests.integration.server.testkit import POP

BLOB_TIMEOUT_S = 2.0
UNAVAILABLE = "the blob store is temporarily unavailable; retry the request later"


@pytest.fixture
def proxied_gcs(gcs_emulator, monkeypatch):
    """A blob store whose every request crosses a proxy to the emulator; yields both."""
    host, port = gcs_emulator.host.removeprefix("http://").rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{proxy.address}")
    store = make_blob_store(
        f"gs://{gcs_emulator.bucket}/outage-{uuid.uuid4().hex}", timeout_s=BLOB_TIMEOUT_S
    )
    yield store, proxy
    proxy.close()
    store.close()


def _assert_unavailable(resp) -> None:
    assert resp.status_code == 503, resp.get_data(as_text=True)
    assert resp.headers["Retry-After"].isdigit()
    assert resp.get_json()["error"] == {
        "code": 503,
        "status": "UNAVAILABLE",
        "message": UNAVAILABLE,
    }


def _round_and_assignment(ctx, assignment_id):
    with ctx.database.sessions() as session:
        rnd = session.scalar(select(Round).where(Round.iteration_id == 1))
        return rnd, session.get(Assignment, assignment_id)


@pytest.mark.gcs
@pytest.mark.slow
def test_blob_store_outage_fails_cleanly_and_the_round_resumes(settings, proxied_gcs):
    # Arrange: round 1 (goal 2) has one update; a second device is ready to upload.
    store, proxy = proxied_gcs
    app = create_app(dataclasses.replace(settings, max_apply_attempts=2), blobs=store)
    ctx = app.extensions["fcp"]
    api = testkit.Api(app.test_client())
    worker = Worker(worker_deps(ctx))
    api.open_training(testkit.training_task(report_goal=2))
    api.contribute(testkit.update_bytes(0.1, 0.1))
    second = api.assign()
    location = api.report(second)[1].upload_instruction.upload_location
    update = testkit.update_bytes(0.3, 0.3)
    checkpoint_url = second.proto.init_checkpoint.uri

    # Act + Assert: cut off, then hung. Uploads and downloads answer 503; nothing changes.
    for fault in (proxy.cut, proxy.stall):
        fault()
        _assert_unavailable(api.upload(location, update))
        _assert_unavailable(api.client.get(checkpoint_url))
        rnd, assignment = _round_and_assignment(ctx, second.proto.assignment_id)
        assert (rnd.status, rnd.reported_count) == (RoundStatus.COLLECTING, 1)
        assert assignment.status == AssignmentStatus.LOCAL_COMPLETED
        proxy.restore()

    # The store is back (slowly): the same upload is accepted, once.
    proxy.delay(0.05)
    assert api.upload(location, update).status_code == 204
    assert api.upload(location, update).status_code == 204  # a retry is not counted again
    rnd, _ = _round_and_assignment(ctx, second.proto.assignment_id)
    assert (rnd.status, rnd.reported_count) == (RoundStatus.AGGREGATING, 2)

    # Aggregation during the outage waits, more ticks than the attempt bound, without failing.
    proxy.cut()
    for _ in range(ctx.settings.max_apply_attempts + 2):
        assert worker.tick().rounds_closed == 0
    rnd, _ = _round_and_assignment(ctx, second.proto.assignment_id)
    assert (rnd.status, rnd.apply_attempts) == (RoundStatus.AGGREGATING, 0)

    # The store returns: the round completes and round 2 starts from its checkpoint.
    proxy.restore()
    assert worker.tick().rounds_closed == 1
    with ctx.database.sessions() as session:
        rounds = session.scalars(select(Round).order_by(Round.iteration_id)).all()
        task = session.scalar(select(Task))
    assert [(r.iteration_id, r.status, r.aggregated_count) for r in rounds] == [
        (1, RoundStatus.COMPLETED, 2),
        (2, RoundStatus.COLLECTING, 0),
    ]
    assert task.status.value == "OPEN"
    metrics = json.loads(store.get(blob_paths.metrics_blob(POP, 1, 1)))
    assert metrics["server/aggregator/num_clients"] == 2
    for name in store.list(f"{POP}/"):  # nothing half-written anywhere
        raw = store.get_raw(name)
        assert hashlib.sha256(store.get(name)).hexdigest() == raw.info.sha256, name
    ctx.database.dispose()
