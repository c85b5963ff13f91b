"""Downloads' per-process caches (`services.download_cache`), SQLite and PostgreSQL.

Each process records the tasks it found past CREATED and caches their blobs' metadata (and
small blobs' bytes); every answer must stay the one a process without the caches gives.
A second app on the same database and blob store stands for another gunicorn worker or host.
"""

import contextlib
import dataclasses
import gzip
import hashlib

import numpy as np
import pytest
from sqlalchemy import event

from fcp_server.services import blob_paths
from fcp_server.services.download_cache import PublishedBlobs
from tests.integration.server import testkit
from tests.integration.server.testkit import POP, Api

PLAN = f"/taskassignment/v1/population/{POP}/task/1/client_only_plan"
UNKNOWN_PLAN = f"/taskassignment/v1/population/{POP}/task/9/client_only_plan"


def _checkpoint(result_id: int, task_id: int = 1) -> str:
    return (
        f"/taskassignment/v1/population/{POP}/task/{task_id}"
        f"/aggregation/{result_id}/client_checkpoint"
    )


@contextlib.contextmanager
def _statements(ctx):
    """Counts the SQL statements the app's engine runs inside the block."""
    seen: list[str] = []

    def before(_conn, _cursor, statement, *_args):
        seen.append(statement)

    event.listen(ctx.database.engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(ctx.database.engine, "before_cursor_execute", before)


def _answer(resp) -> tuple[int, dict[str, str], bytes]:
    return resp.status_code, dict(resp.headers), resp.data


def test_a_task_opened_by_another_process_is_found_after_this_one_404ed_it(make_app, blobs):
    app, other = make_app(), make_app()
    client = app.test_client()
    assert client.get(PLAN).status_code == 404
    assert client.get(_checkpoint(0)).status_code == 404

    Api(other.test_client()).open_training()

    plan = client.get(PLAN)
    assert plan.status_code == 200
    assert plan.data == blobs.get(blob_paths.artifact_blob(POP, 1, "client_only_plan"))
    assert client.get(_checkpoint(0)).status_code == 200


def test_an_unknown_task_is_looked_up_and_404s_every_time(api, ctx):
    api.open_training()
    assert api.client.get(PLAN).status_code == 200
    for _ in range(3):
        with _statements(ctx) as seen:
            assert api.client.get(UNKNOWN_PLAN).status_code == 404
            assert api.client.get(_checkpoint(0, task_id=9)).status_code == 404
        assert [s.split()[0] for s in seen if "FROM tasks" in s] == ["SELECT", "SELECT"]
    assert (POP, 9) not in ctx.known_tasks and len(ctx.known_tasks) == 1
    bad_pop = "/taskassignment/v1/population/-bad/task/1/client_only_plan"
    assert api.client.get(bad_pop).status_code == 400


def test_a_known_task_is_served_without_a_database_statement(api, ctx):
    api.open_training()
    with _statements(ctx) as seen:
        first = [_answer(api.client.get(u)) for u in (PLAN, _checkpoint(0))]
    assert seen and (POP, 1) in ctx.known_tasks

    with _statements(ctx) as seen:
        again = [_answer(api.client.get(u)) for u in (PLAN, _checkpoint(0))]
    assert seen == []
    assert again == first and [status for status, _, _ in first] == [200, 200]


def _put_blobs(blobs) -> dict[str, tuple[str, bytes]]:
    """Blob name and content by URL: round 0's plan and checkpoint (stored gzip, small), an
    uncompressed checkpoint and a large one."""
    rng = np.random.default_rng(0)
    names = {
        PLAN: blob_paths.artifact_blob(POP, 1, "client_only_plan"),
        _checkpoint(0): blob_paths.client_checkpoint_blob(POP, 1, 0),
        _checkpoint(7): blob_paths.client_checkpoint_blob(POP, 1, 7),
        _checkpoint(8): blob_paths.client_checkpoint_blob(POP, 1, 8),
    }
    blobs.put(names[_checkpoint(7)], b"stored uncompressed")
    large = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()  # incompressible
    blobs.put(names[_checkpoint(8)], large, gzip=True)
    return {url: (name, blobs.get(name)) for url, name in names.items()}


_HEADERS = [  # gzip first, so that the later requests meet a filled cache
    {"Accept-Encoding": "gzip"},
    {},
    {"Accept-Encoding": "identity, gzip;q=0"},
    {"Accept-Encoding": "gzip", "If-None-Match": "ETAG"},
    {"If-None-Match": "ETAG"},
    {"Accept-Encoding": "gzip", "If-None-Match": '"not-the-etag"'},
]


@pytest.mark.parametrize("url", [PLAN, _checkpoint(0), _checkpoint(7), _checkpoint(8)])
def test_cached_answers_are_a_fresh_process_answers_with_etag_304_and_gzip(make_app, blobs, url):
    app = make_app()
    Api(app.test_client()).open_training()
    name, content = _put_blobs(blobs)[url]
    # A per-blob bound below the large checkpoint: that one keeps only its metadata.
    cache = PublishedBlobs(max_blob_bytes=2000)
    app.extensions["fcp"] = dataclasses.replace(app.extensions["fcp"], published_blobs=cache)
    etag = f'"{hashlib.sha256(content).hexdigest()}"'
    client = app.test_client()

    for headers in [{k: v.replace("ETAG", etag) for k, v in h.items()} for h in _HEADERS] * 2:
        answer = _answer(client.get(url, headers=headers))

        assert answer == _answer(make_app().test_client().get(url, headers=headers)), headers
        status, got, body = answer
        assert got["ETag"] == etag and got["Cache-Control"] == "private, max-age=3600"
        if headers.get("If-None-Match") == etag:
            assert status == 304 and body == b""
            continue
        gzipped = headers.get("Accept-Encoding") == "gzip"
        assert status == 200 and got.get("Content-Encoding") == ("gzip" if gzipped else None)
        assert (gzip.decompress(body) if gzipped else body) == content
    entry = cache.get(name)
    assert entry is not None and f'"{entry.sha256}"' == etag
    if url in (PLAN, _checkpoint(0)):  # small and stored gzip: its bytes are kept
        assert entry.stored is not None and gzip.decompress(entry.stored) == content
    else:
        assert entry.stored is None
    assert cache.cached_bytes == len(entry.stored or b"") <= 2000


def test_a_created_task_is_looked_up_every_time_and_a_replaced_plan_served(api, ctx):
    created = api.created(testkit.training_task()).task
    api.upload_artifacts(created, testkit.server_plan(), testkit.client_plan(), None)
    first = api.client.get(PLAN, headers={"Accept-Encoding": "gzip"})
    assert first.status_code == 200

    plan = testkit.client_plan()
    plan.tflite_model = b"a rebuilt model"
    assert api.put(created.client_only_plan_url[0], plan.SerializeToString()).status_code == 204
    with _statements(ctx) as seen:
        again = api.client.get(PLAN, headers={"Accept-Encoding": "gzip"})

    assert seen, "a CREATED task must be looked up again"
    assert gzip.decompress(again.data) == plan.SerializeToString()
    assert again.headers["ETag"] == f'"{hashlib.sha256(plan.SerializeToString()).hexdigest()}"'
    assert again.headers["ETag"] != first.headers["ETag"]
    assert len(ctx.known_tasks) == 0 and len(ctx.published_blobs) == 0


def test_a_checkpoint_published_after_a_404_is_served(api, blobs):
    api.open_training()
    assert api.client.get(_checkpoint(1)).status_code == 404
    assert api.client.get(_checkpoint(1)).status_code == 404

    blobs.put(blob_paths.client_checkpoint_blob(POP, 1, 1), b"round 1 weights", gzip=True)

    resp = api.client.get(_checkpoint(1))
    assert resp.status_code == 200 and resp.data == b"round 1 weights"


def test_a_canceled_task_still_serves_its_artifacts(make_app):
    app = make_app()
    api = Api(app.test_client())
    api.open_training()
    assert api.client.get(PLAN).status_code == 200  # recorded while OPEN
    assert api.task_call(POP, 1, "cancel").status_code == 200

    fresh = make_app().test_client()  # first sees the task CANCELED
    for client in (api.client, fresh, fresh):
        assert client.get(PLAN).status_code == 200
        assert client.get(_checkpoint(0)).status_code == 200
