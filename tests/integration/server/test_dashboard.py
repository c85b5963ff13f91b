"""The monitoring dashboard after real rounds driven through the HTTP API (SQLite, PostgreSQL)."""

import datetime as dt
import json

import pytest
from sqlalchemy import update

from fcp_server.api import dashboard as dashboard_api
from fcp_server.protos import task_assignments_pb2, task_builder_pb2
from fcp_server.services import blob_paths
from fcp_server.services import dashboard as dashboard_service
from fcp_server.storage.models import Round, RoundMetric, Task
from tests.integration.server import testkit
from tests.integration.server.testkit import POP

LOSS = "server/client_work/train/loss"
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)  # ManualClock's start


def with_dashboard(app):
    # create_app may not register the blueprint yet (the lead wires it in); tests do.
    if "dashboard" not in app.blueprints:
        app.register_blueprint(dashboard_api.blueprint)
    return app


@pytest.fixture
def app(make_app):
    return with_dashboard(make_app())


def dp_plan():
    return testkit.server_plan(
        report_goal=2,
        dp_type=task_builder_pb2.DpAggregator.FIXED_GAUSSIAN,
        noise_multiplier=1.0,
        clip_norm=1.0,
        population_size=1000,
        target_epsilon=10.0,
    )


def run_two_rounds_and_start_a_third(api, clock, worker):
    """Round 1 and 2 complete (losses 0.3 then 0.1); round 3 has 3 check-ins, 1 upload."""
    api.open_training(testkit.training_task(report_goal=2, rounds=3), plan=dp_plan())
    api.contribute(testkit.update_bytes(0.1, 0.1, loss=(2.0, 10.0)))
    api.contribute(testkit.update_bytes(0.1, 0.1, loss=(4.0, 10.0)))
    clock.advance(30)  # 00:00:30
    assert worker.tick().rounds_closed == 1
    clock.advance(30)  # 00:01:00
    api.contribute(testkit.update_bytes(0.1, 0.1, loss=(1.0, 10.0)))
    api.contribute(testkit.update_bytes(0.1, 0.1, loss=(1.0, 10.0)))
    clock.advance(45)  # 00:01:45
    assert worker.tick().rounds_closed == 1
    clock.advance(30)  # 00:02:15
    api.assign()
    failed = api.assign()
    assert api.report(failed, task_assignments_pb2.ReportResultRequest.FAILED)[0].status_code == 200
    api.contribute()


def get_json(api, path="/dashboard/data.json", **kwargs):
    resp = api.client.get(path, **kwargs)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    return resp.get_json()


def test_data_json_shows_tasks_round_progress_epsilon_and_metric_series(api, clock, worker, blobs):
    run_two_rounds_and_start_a_third(api, clock, worker)
    api.created(testkit.training_task(), pop="mnist")  # a second population, task CREATED

    data = get_json(api)

    assert data["generated_at"] == "2025-01-01T00:02:15+00:00"
    assert data["refresh_seconds"] == dashboard_api.REFRESH_SECONDS
    assert data["populations"] == [
        {"name": POP, "tasks_by_status": {"OPEN": 1}},
        {"name": "mnist", "tasks_by_status": {"CREATED": 1}},
    ]
    assert [(t["population"], t["task_id"]) for t in data["tasks"]] == [("mnist", 1), (POP, 1)]
    task = data["tasks"][1]
    assert (task["status"], task["kind"]) == ("OPEN", "TRAINING")
    assert (task["completed_iterations"], task["total_iterations"], task["report_goal"]) == (
        2,
        3,
        2,
    )
    assert task["current_round"] | {"created_at": None, "deadline_at": None} == {
        "iteration_id": 3,
        "attempt": 0,
        "status": "COLLECTING",
        "assigned": 3,
        "active": 2,
        "reported": 1,
        "goal": 2,
        "capacity": task["current_round"]["capacity"],
        "created_at": None,
        "deadline_at": None,
    }
    assert task["current_round"]["created_at"] == "2025-01-01T00:01:45+00:00"
    # Epsilon agrees with the task API and with round 2's published metrics file.
    published = json.loads(blobs.get(blob_paths.metrics_blob(POP, 1, 2)))
    assert task["epsilon_spent"] > 0
    assert task["epsilon_spent"] == pytest.approx(api.get_task(1).epsilon_spent)
    assert task["epsilon_spent"] == pytest.approx(published["server/dp/epsilon_spent"])
    assert task["target_epsilon"] == 10.0
    # Client metrics come first; every series has one point per completed round.
    series = {m["name"]: m["points"] for m in task["metrics"]}
    names = [m["name"] for m in task["metrics"]]
    client = [n for n in names if n.startswith("server/client_work/")]
    assert names[: len(client) + 1] == [*client, "server/dp/epsilon_spent"]
    assert [i for i, _ in series[LOSS]] == [1, 2]
    assert [v for _, v in series[LOSS]] == pytest.approx([0.3, 0.1])
    assert series["server/dp/epsilon_spent"][-1][1] == pytest.approx(task["epsilon_spent"])
    assert len(task["metrics"]) <= dashboard_service.MAX_SERIES
    assert data["tasks"][0]["current_round"] is None and data["tasks"][0]["metrics"] == []


def test_operations_count_checkins_per_minute_by_result_and_time_the_rounds(api, clock, worker):
    run_two_rounds_and_start_a_third(api, clock, worker)

    ops = get_json(api)["operations"]

    assert ops["window_end"] == "2025-01-01T00:02:15+00:00"
    assert ops["window_start"] == "2024-12-31T23:02:15+00:00"  # the default hour
    assert ops["assignments_per_minute"] == [
        {"minute": "2025-01-01T00:00:00+00:00", "result": "UPLOAD_COMPLETED", "count": 2},
        {"minute": "2025-01-01T00:01:00+00:00", "result": "UPLOAD_COMPLETED", "count": 2},
        {"minute": "2025-01-01T00:02:00+00:00", "result": "ASSIGNED", "count": 1},
        {"minute": "2025-01-01T00:02:00+00:00", "result": "LOCAL_FAILED", "count": 1},
        {"minute": "2025-01-01T00:02:00+00:00", "result": "UPLOAD_COMPLETED", "count": 1},
    ]
    assert [
        (r["iteration_id"], r["status"], r["created_at"][11:19], (r["completed_at"] or "")[11:19])
        for r in ops["rounds"]
    ] == [
        (1, "COMPLETED", "00:00:00", "00:00:30"),
        (2, "COMPLETED", "00:00:30", "00:01:45"),
        (3, "COLLECTING", "00:01:45", ""),
    ]
    assert {(r["population"], r["task_id"], r["attempt"]) for r in ops["rounds"]} == {(POP, 1, 0)}


def test_operations_window_excludes_older_activity(api, clock, worker):
    run_two_rounds_and_start_a_third(api, clock, worker)
    clock.advance(2 * 60)  # now 00:04:15; a 3-minute window starts at 00:01:15

    ops = get_json(api, "/dashboard/data.json?window_minutes=3")["operations"]

    assert ops["window_start"] == "2025-01-01T00:01:15+00:00"
    assert {b["minute"][11:16] for b in ops["assignments_per_minute"]} == {"00:02"}
    assert [r["iteration_id"] for r in ops["rounds"]] == [2, 3]


def test_page_renders_the_snapshot_and_loads_only_local_assets(api, clock, worker):
    run_two_rounds_and_start_a_third(api, clock, worker)

    resp = api.client.get("/dashboard")

    assert resp.status_code == 200 and resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    assert f"{POP} / task 1" in html
    assert '<td class="rounds">2 / 3</td>' in html
    assert "assigned 3, reported 1 / 2" in html
    assert '<progress max="2" value="1"></progress>' in html
    assert 'data-source="/dashboard/data.json"' in html
    assert '<script src="/dashboard/static/dashboard.js" defer></script>' in html
    assert "http://" not in html and "https://" not in html  # no CDN, no external resource
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["Cache-Control"] == "no-store"
    for asset, mimetype in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        served = api.client.get(f"/dashboard/static/{asset}")
        assert served.status_code == 200 and served.mimetype == mimetype
        body = served.get_data(as_text=True)
        served.close()
        assert "http://" not in body.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in body


def test_stored_text_is_escaped_in_the_page_and_kept_exact_in_json(api, ctx, clock, worker):
    run_two_rounds_and_start_a_third(api, clock, worker)
    hostile = "<img src=x onerror=alert(1)>&\"'"
    with ctx.database.sessions() as session, session.begin():
        session.execute(update(Task).values(status_reason=hostile))
        first = session.query(Round).filter_by(iteration_id=1).one()
        session.add(RoundMetric(round_pk=first.id, name="server/client_work/<b>x</b>", value=1.0))

    html = api.client.get("/dashboard").get_data(as_text=True)
    data = get_json(api)

    assert "<img" not in html and "<b>x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&#34;&#39;" in html
    assert "server/client_work/&lt;b&gt;x&lt;/b&gt;" in html
    assert data["tasks"][0]["status_reason"] == hostile
    assert "server/client_work/<b>x</b>" in {m["name"] for m in data["tasks"][0]["metrics"]}


def test_empty_server_shows_no_tasks(api):
    data = get_json(api)
    assert (data["populations"], data["tasks"]) == ([], [])
    assert data["operations"]["assignments_per_minute"] == []
    assert "No tasks yet." in api.client.get("/dashboard").get_data(as_text=True)


@pytest.mark.parametrize("raw", ["0", "-5", "abc", str(7 * 24 * 60 + 1)])
def test_bad_window_is_a_400_naming_the_parameter(api, raw):
    resp = api.client.get(f"/dashboard/data.json?window_minutes={raw}")
    assert resp.status_code == 400
    assert "window_minutes" in resp.get_json()["error"]["message"]


def test_admin_key_guards_page_and_data_but_not_static_assets(make_app):
    client = with_dashboard(make_app(admin_api_key="s3cret")).test_client()
    for path in ("/dashboard", "/dashboard/data.json"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"x-api-key": "wrong"}).status_code == 401
        assert client.get(path, headers={"x-api-key": "s3cret"}).status_code == 200
        assert client.get(path + "?key=s3cret").status_code == 200
    served = client.get("/dashboard/static/dashboard.js")
    assert served.status_code == 200
    served.close()


def test_dashboard_is_read_only(api):
    for method in ("post", "put", "delete", "patch"):
        for path in ("/dashboard", "/dashboard/data.json"):
            assert getattr(api.client, method)(path).status_code == 405


def test_operations_refuses_bad_windows(ctx):
    with ctx.database.sessions() as session:
        for since, until in (
            (T0, T0),
            (T0, T0 - dt.timedelta(minutes=1)),
            (T0, T0 + dashboard_service.MAX_WINDOW + dt.timedelta(seconds=1)),
            (T0.replace(tzinfo=None), T0 + dt.timedelta(minutes=1)),
        ):
            with pytest.raises(ValueError, match="window"):
                dashboard_service.operations(session, since=since, until=until)


def test_api_helper_sees_the_same_task_as_the_dashboard(api):
    # The dashboard's task row and the task-management API agree on a fresh task.
    opened = api.open_training()
    task = get_json(api)["tasks"][0]
    assert (task["task_id"], task["completed_iterations"]) == (opened.task_id, 0)
    assert task["current_round"]["assigned"] == task["current_round"]["reported"] == 0
