"""tools/plot_operations.py on a real server database with rounds, read directly and over HTTP."""

import datetime as dt

import httpx
import numpy as np
import pytest
from matplotlib import image
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from fcp_server.api import dashboard as dashboard_api
from fcp_server.app import create_app, worker_deps
from fcp_server.clock import ManualClock
from fcp_server.protos import task_assignments_pb2
from fcp_server.settings import ServerSettings
from fcp_server.storage.blobs import make_blob_store
from fcp_server.worker import Worker
from tests.integration.server import testkit
from tests.integration.server.testkit import Api
from tools import plot_operations

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)  # ManualClock's start
PNGS = ("assignments_per_minute.png", "round_duration.png", "rounds_over_time.png")


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def server_app(db_url, tmp_path, clock):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    settings = ServerSettings(
        database_url=db_url, embedded_worker=False, auto_migrate=False, admin_api_key="k3y"
    )
    app = create_app(settings, clock=clock, blobs=make_blob_store(blobs.as_uri()))
    if "dashboard" not in app.blueprints:  # until create_app registers it
        app.register_blueprint(dashboard_api.blueprint)
    yield app
    app.extensions["fcp"].database.dispose()


def drive_rounds(app, clock):
    """Two completed rounds of 2 devices (30 s and 75 s long), then 3 check-ins of round 3."""
    api = Api(app.test_client(), headers={"x-api-key": "k3y"})
    worker = Worker(worker_deps(app.extensions["fcp"]))
    api.open_training(testkit.training_task(report_goal=2, rounds=3))
    api.contribute()
    api.contribute()
    clock.advance(30)
    assert worker.tick().rounds_closed == 1
    clock.advance(30)
    api.contribute()
    api.contribute()
    clock.advance(45)
    assert worker.tick().rounds_closed == 1
    clock.advance(30)
    api.assign()
    failed = api.assign()
    api.report(failed, task_assignments_pb2.ReportResultRequest.FAILED)
    api.contribute()


def pixels_of(path, hex_color, tolerance=0.04):
    """How many pixels of the PNG are (nearly) `hex_color`."""
    rgb = np.array([int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    img = image.imread(str(path))[..., :3]
    return int((np.abs(img - rgb).max(axis=-1) < tolerance).sum())


def test_database_url_writes_three_pngs_of_the_rounds(server_app, clock, db_url, tmp_path):
    drive_rounds(server_app, clock)
    out = tmp_path / "plots"

    rc = plot_operations.main(
        ["--database-url", db_url, "--until", clock.now().isoformat(), "--out", str(out)]
    )

    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(PNGS)
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The bars and lines are drawn: uploads in green, the failure in red, the tasks' lines blue.
    assert pixels_of(out / "assignments_per_minute.png", "#2ca02c") > 200
    assert pixels_of(out / "assignments_per_minute.png", "#d62728") > 50
    assert pixels_of(out / "round_duration.png", "#1f77b4") > 50
    assert pixels_of(out / "rounds_over_time.png", "#1f77b4") > 50


def test_database_read_matches_the_dashboard_api(server_app, clock, db_url):
    drive_rounds(server_app, clock)
    window = dt.timedelta(minutes=60)

    from_db = plot_operations.read_from_database(db_url, until=clock.now(), window=window)
    from_api = plot_operations.read_from_server(
        "http://fcp.test",
        window_minutes=60,
        api_key="k3y",
        transport=httpx.WSGITransport(app=server_app),
    )

    assert from_api == from_db
    assert [(b.minute.minute, b.result, b.count) for b in from_db.assignments] == [
        (0, "UPLOAD_COMPLETED", 2),
        (1, "UPLOAD_COMPLETED", 2),
        (2, "ASSIGNED", 1),
        (2, "LOCAL_FAILED", 1),
        (2, "UPLOAD_COMPLETED", 1),
    ]
    durations = [
        (r.completed_at - r.created_at).total_seconds() for r in from_db.rounds if r.completed_at
    ]
    assert durations == [30.0, 75.0]


def test_server_read_needs_the_admin_key(server_app):
    transport = httpx.WSGITransport(app=server_app)
    with pytest.raises(httpx.HTTPStatusError, match="401"):
        plot_operations.read_from_server(
            "http://fcp.test", window_minutes=60, api_key="wrong", transport=transport
        )


def test_readonly_engine_cannot_write(server_app, db_url):
    engine = plot_operations.readonly_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM tasks")).scalar_one() == 0
            with pytest.raises(DBAPIError, match=r"(?i)read.?only"):
                conn.execute(text("CREATE TABLE intruder (x INTEGER)"))
    finally:
        engine.dispose()


def test_empty_window_writes_nothing_and_fails(server_app, db_url, tmp_path, capsys):
    rc = plot_operations.main(
        ["--database-url", db_url, "--until", T0.isoformat(), "--out", str(tmp_path / "p")]
    )
    assert rc == 1
    assert "no check-ins or rounds" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_missing_sqlite_file_is_refused_not_created(tmp_path):
    missing = tmp_path / "nope.db"
    with pytest.raises(ValueError, match="does not exist"):
        plot_operations.readonly_engine(f"sqlite:///{missing}")
    assert not missing.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--out", "x"],  # no source
        ["--database-url", "sqlite:///a.db", "--server", "http://h"],
        ["--database-url", "sqlite:///a.db", "--window-minutes", "0"],
        ["--database-url", "sqlite:///a.db", "--until", "2025-01-01T00:00:00"],
        ["--server", "http://h", "--until", "2025-01-01T00:00:00+00:00"],
    ],
)
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as exc:
        plot_operations.main(argv)
    assert exc.value.code == 2


def test_malformed_operations_json_is_a_value_error():
    good = {
        "window_start": "2025-01-01T00:00:00+00:00",
        "window_end": "2025-01-01T01:00:00+00:00",
        "assignments_per_minute": [
            {"minute": "2025-01-01T00:00:00+00:00", "result": "ASSIGNED", "count": 1}
        ],
        "rounds": [],
    }
    assert plot_operations.operations_from_json(good).assignments[0].count == 1
    for broken in (
        {k: v for k, v in good.items() if k != "rounds"},
        {**good, "window_end": "2025-01-01T01:00:00"},
        {**good, "assignments_per_minute": [{"minute": "x", "result": "A", "count": 1}]},
        {**good, "assignments_per_minute": [{"minute": good["window_end"], "result": "A"}]},
        {
            **good,
            "assignments_per_minute": [
                {"minute": good["window_end"], "result": "A", "count": True}
            ],
        },
    ):
        with pytest.raises(ValueError):
            plot_operations.operations_from_json(broken)
