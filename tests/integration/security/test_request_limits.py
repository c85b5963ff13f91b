"""Every route that takes a body refuses one above its bound with 413 and a clear message,
whether or not the client declares the length, and changes nothing when it does."""

import gzip
import io

import pytest
from sqlalchemy import select

from fcp_server.api import wire
from fcp_server.storage.models import Round, Task
from tests.integration.server import testkit
from tests.integration.server.testkit import POP

MAX_UPLOAD = 4096
MAX_ARTIFACT = 8192
# Routes that take a body, by endpoint; every other POST/PUT route must take none.
BODY_ROUTES = {
    "tasks.create_task": wire.MAX_MESSAGE_BYTES,
    "tasks.put_artifact": MAX_ARTIFACT,
    "devices.create_task_assignment": wire.MAX_MESSAGE_BYTES,
    "devices.report_result": wire.MAX_MESSAGE_BYTES,
    "devices.upload": MAX_UPLOAD,
}
BODYLESS_ROUTES = {"tasks.open_task", "tasks.cancel_task"}


@pytest.fixture
def small_app(make_app):
    return make_app(max_upload_bytes=MAX_UPLOAD, max_artifact_bytes=MAX_ARTIFACT)


@pytest.fixture
def setup(small_app):
    """An OPEN training task with one device between report and upload, and a CREATED task."""
    api = testkit.Api(small_app.test_client())
    api.open_training()
    a = api.assign()
    _, answer = api.report(a)
    created = api.created(testkit.training_task(), pop="other").task
    return api, a, answer.upload_instruction.upload_location, created


def _urls(a, upload_url, created) -> dict[str, str]:
    return {
        "tasks.create_task": f"/taskmanagement/v1/population/{POP}:create-task",
        "tasks.put_artifact": created.server_phase_url[0],
        "devices.create_task_assignment": (
            f"/taskassignment/v1/population/{POP}:create-task-assignment"
        ),
        "devices.report_result": f"{a.base}:report-result",
        "devices.upload": upload_url,
    }


def _state(app) -> tuple:
    ctx = app.extensions["fcp"]
    with ctx.database.sessions() as session:
        rounds = session.execute(select(Round.id, Round.active_count, Round.reported_count)).all()
        tasks = session.execute(select(Task.id, Task.status, Task.server_plan_sha256)).all()
    return sorted(rounds), sorted(tasks), sorted(ctx.blobs.list())


def test_every_body_route_is_covered(small_app):
    endpoints = {
        rule.endpoint
        for rule in small_app.url_map.iter_rules()
        if rule.methods and rule.methods & {"POST", "PUT", "PATCH"}
    }
    assert endpoints == set(BODY_ROUTES) | BODYLESS_ROUTES


@pytest.mark.parametrize("endpoint", list(BODY_ROUTES))
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
def test_an_oversized_body_gets_413_and_changes_nothing(small_app, setup, endpoint, declared):
    api, a, upload_url, created = setup
    url = _urls(a, upload_url, created)[endpoint]
    limit = BODY_ROUTES[endpoint]
    before = _state(small_app)
    body = b"\x00" * (limit + 1)
    method = "POST" if endpoint.endswith(("create_task", "create_task_assignment")) else "PUT"
    headers = {"Content-Type": "application/octet-stream"}
    if declared:
        resp = api.client.open(url, method=method, data=body, headers=headers)
    else:  # chunked, no Content-Length (as gunicorn passes it): reading stops at the bound
        resp = api.client.open(
            url,
            method=method,
            input_stream=io.BytesIO(body),
            headers={**headers, "Transfer-Encoding": "chunked"},
            environ_overrides={"wsgi.input_terminated": True},
        )
    assert resp.status_code == 413, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert error["status"] == "OUT_OF_RANGE"
    assert f"limit of {limit} bytes" in error["message"] or f"limit is {limit}" in error["message"]
    assert _state(small_app) == before


def test_a_gzip_bomb_upload_gets_413_and_changes_nothing(small_app, setup):
    api, _, upload_url, _ = setup
    before = _state(small_app)
    bomb = gzip.compress(b"\x00" * (64 * MAX_UPLOAD))  # small on the wire, huge unpacked
    assert len(bomb) < MAX_UPLOAD
    resp = api.upload(upload_url, b"", raw=bomb)
    assert resp.status_code == 413
    assert str(MAX_UPLOAD) in resp.get_json()["error"]["message"]
    assert _state(small_app) == before


def test_bodies_at_the_bound_are_accepted(small_app, setup):
    api, _, upload_url, _ = setup
    update = testkit.update_bytes()
    assert len(update) <= MAX_UPLOAD
    assert api.upload(upload_url, update, compress=False).status_code == 204
