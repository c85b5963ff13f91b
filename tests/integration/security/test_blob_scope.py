"""No endpoint reads or writes a blob outside the prefix of the task its URL names.

The app runs on a real local blob store wrapped in a recorder of every blob name it is asked
for. Each route that touches blobs is called with path traversal, other populations, other
task ids, other rounds and other assignments' ids; every name touched must lie under
`{population}/{task}/` of a task that exists in the URL's population (an eval task may also
read its own training task's checkpoints, as round outputs are copied from it).
"""

import numpy as np
import pytest
from sqlalchemy import select

from fcp_server.app import create_app
from fcp_server.protos import task_assignments_pb2
from fcp_server.storage.models import Task
from tests.integration.security.security_kit import RecordingBlobs
from tests.integration.server import testkit
from tests.integration.server.testkit import POP, Api

OTHER = "other"
TA = "/taskassignment/v1/population"
TM = "/taskmanagement/v1/population"
HOSTILE_POPS = [
    "..",
    ".",
    "%2e%2e",
    "..%2F" + POP,
    POP + "%2F..",
    POP + "%2F1",
    "%2F" + POP,
    POP + "%00",
    POP + "%5C..",
    "-" + POP,
    "x" * 65,
]


@pytest.fixture
def world(settings, blobs, clock):
    """digits: OPEN training (1) + eval (2) tasks and a device ready to upload; other: a
    CREATED training task (1) waiting for its artifacts."""
    recorder = RecordingBlobs(blobs)
    app = create_app(settings, clock=clock, blobs=recorder, checkin_rng=np.random.default_rng(7))
    api = Api(app.test_client())
    api.open_training_and_eval(
        testkit.training_task(report_goal=2, rounds=3), testkit.eval_task(report_goal=1)
    )
    assignment = api.assign()
    while assignment.proto.task_id != "1":
        api.report(assignment, task_assignments_pb2.ReportResultRequest.NOT_ELIGIBLE)
        assignment = api.assign()
    _, answer = api.report(assignment)
    created = api.created(testkit.training_task(), pop=OTHER).task
    recorder.calls.clear()
    yield app, api, recorder, assignment, answer.upload_instruction.upload_location, created
    app.extensions["fcp"].database.dispose()


def _allowed_prefixes(app, pop: str, task_id: int | None) -> set[str]:
    """`{pop}/{task}/` of the URL's task if it exists (plus an eval task's training task)."""
    if task_id is None:
        return set()
    with app.extensions["fcp"].database.sessions() as session:
        task = session.scalar(
            select(Task).where(Task.population_name == pop, Task.task_id == task_id)
        )
        if task is None:
            return set()
        prefixes = {f"{pop}/{task_id}/"}
        if task.training_task_pk is not None:
            training = session.get(Task, task.training_task_pk)
            assert training is not None
            prefixes.add(f"{pop}/{training.task_id}/")
    return prefixes


def _check(app, recorder, method, url, pop, task_id, body=b"", **kw):
    recorder.calls.clear()
    headers = {"Content-Type": "application/octet-stream", **kw.pop("headers", {})}
    resp = app.test_client().open(url, method=method, data=body, headers=headers)
    allowed = _allowed_prefixes(app, pop, task_id)
    outside = [
        (op, name) for op, name in recorder.calls if not any(name.startswith(p) for p in allowed)
    ]
    assert not outside, (method, url, resp.status_code, outside)
    return resp


def test_path_traversal_and_malformed_populations_touch_no_blob(world):
    app, _, recorder, _, _, _ = world
    update = testkit.update_bytes()
    aid = "00000000-0000-4000-8000-000000000000"
    for pop in HOSTILE_POPS:
        urls = [
            ("GET", f"{TA}/{pop}/task/1/client_only_plan"),
            ("GET", f"{TA}/{pop}/task/1/aggregation/0/client_checkpoint"),
            ("PUT", f"{TA}/{pop}/task/1/aggregation/1/task-assignment/{aid}:upload"),
            ("PUT", f"{TM}/{pop}/tasks/1/artifacts/checkpoint"),
            ("POST", f"{TM}/{pop}/tasks/1:open"),
            ("POST", f"{TM}/{pop}/tasks/1:cancel"),
            ("POST", f"{TA}/{pop}:create-task-assignment"),
            ("PUT", f"{TA}/{pop}/task/1/aggregation/1/task-assignment/{aid}:report-result"),
        ]
        for method, url in urls:
            resp = _check(app, recorder, method, url, pop, None, body=update)
            # 308: Werkzeug merges "//" and redirects, touching nothing.
            assert resp.status_code in (308, 400, 404, 405), (url, resp.status_code)
            assert not recorder.calls, (url, recorder.calls)


def test_artifact_kinds_cannot_escape_the_task(world):
    app, _, recorder, _, _, created = world
    base = f"{TM}/{OTHER}/tasks/{created.task_id}/artifacts"
    for kind in ["..", "%2e%2e", "..%2Fcheckpoint", "checkpoint%2F..%2F..%2Fx", "gradient", "s"]:
        resp = _check(app, recorder, "PUT", f"{base}/{kind}", OTHER, created.task_id, b"x")
        assert resp.status_code in (400, 404), (kind, resp.status_code)
        assert not recorder.calls, kind


def test_other_task_ids_and_populations_stay_in_their_own_prefix(world):
    app, api, recorder, _, _, created = world
    checkpoint = testkit.initial_checkpoint()
    cases = [
        # (method, url, URL population, URL task id, expected status)
        ("GET", f"{TA}/{POP}/task/3/client_only_plan", POP, 3, 404),
        ("GET", f"{TA}/{OTHER}/task/2/client_only_plan", OTHER, 2, 404),
        ("GET", f"{TA}/{OTHER}/task/1/client_only_plan", OTHER, 1, 404),  # not uploaded yet
        ("GET", f"{TA}/{POP}/task/1/aggregation/7/client_checkpoint", POP, 1, 404),
        ("GET", f"{TA}/{OTHER}/task/1/aggregation/0/client_checkpoint", OTHER, 1, 404),
        ("PUT", f"{TM}/{POP}/tasks/1/artifacts/checkpoint", POP, 1, 409),  # OPEN: frozen
        ("PUT", f"{TM}/{POP}/tasks/9/artifacts/checkpoint", POP, 9, 404),
        ("PUT", f"{TM}/{OTHER}/tasks/2/artifacts/checkpoint", OTHER, 2, 404),
        ("POST", f"{TM}/{OTHER}/tasks/2:open", OTHER, 2, 404),
        ("POST", f"{TM}/{OTHER}/tasks/{created.task_id}:open", OTHER, created.task_id, 409),
        ("POST", f"{TM}/{POP}/tasks/3:cancel", POP, 3, 404),
    ]
    for method, url, pop, task_id, status in cases:
        resp = _check(app, recorder, method, url, pop, task_id, body=checkpoint)
        assert resp.status_code == status, (url, resp.status_code, resp.get_data(as_text=True))
    # The digits task's blobs are untouched by all of the above.
    assert api.client.get(f"{TA}/{POP}/task/1/aggregation/0/client_checkpoint").status_code == 200


def test_an_upload_url_with_foreign_ids_touches_no_blob(world):
    app, _, recorder, assignment, location, _ = world
    update = testkit.update_bytes()
    aid = assignment.proto.assignment_id
    foreign = [
        (location.replace(f"/population/{POP}/", f"/population/{OTHER}/"), OTHER, 1),
        (location.replace("/task/1/", "/task/2/"), POP, 2),  # the eval task
        (location.replace("/aggregation/1/", "/aggregation/2/"), POP, 1),
        (location.replace(aid, aid[:-1] + ("0" if aid[-1] != "0" else "1")), POP, 1),
        (location.replace(aid, aid.upper()), POP, 1),
        (location.replace(aid, "..%2F..%2F0%2Fs%2F0%2Fcheckpoint"), POP, 1),
    ]
    for url, pop, task_id in foreign:
        resp = _check(app, recorder, "PUT", url, pop, task_id, body=update)
        assert resp.status_code == 404, (url, resp.status_code)
        assert not any(op.startswith("put") for op, _ in recorder.calls), url


def test_legitimate_calls_stay_in_their_prefix(world):
    app, _, recorder, _, location, created = world
    plan = testkit.server_plan(report_goal=created.min_aggregation_size)
    calls = [
        ("GET", f"{TA}/{POP}/task/1/client_only_plan", POP, 1, b"", 200),
        ("GET", f"{TA}/{POP}/task/2/client_only_plan", POP, 2, b"", 200),
        ("GET", f"{TA}/{POP}/task/1/aggregation/0/client_checkpoint", POP, 1, b"", 200),
        ("PUT", location, POP, 1, testkit.update_bytes(), 204),
        ("PUT", created.server_phase_url[0], OTHER, 1, plan.SerializeToString(), 204),
    ]
    for method, url, pop, task_id, body, status in calls:
        resp = _check(app, recorder, method, url, pop, task_id, body=body)
        assert resp.status_code == status, (url, resp.get_data(as_text=True))
        assert recorder.calls, url  # these do touch blobs, all inside their prefix
