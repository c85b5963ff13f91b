"""Operations endpoints, the embedded worker thread and the `fcp-server` CLI."""

import json
import threading

from sqlalchemy import select

from fcp_server import cli
from fcp_server.app import create_app
from fcp_server.settings import ServerSettings
from fcp_server.storage import db
from fcp_server.storage.models import DeviceToken
from tests.integration.server import testkit
from tests.integration.server.testkit import POP, Api


def test_health_ready_and_metrics(api, ctx):
    api.open_training()
    api.assign()

    assert api.client.get("/healthz").data == b"ok\n"
    assert api.client.get("/ready").status_code == 200
    text = api.client.get("/metrics").get_data(as_text=True)
    assert f'fcp_checkins_total{{population="{POP}",result="SUCCESS"}}' in text
    assert 'fcp_rounds{status="COLLECTING"} 1' in text
    assert 'fcp_tasks{status="OPEN"} 1' in text
    assert "fcp_http_request_duration_seconds_bucket" in text


def test_ready_is_503_when_the_database_is_gone(tmp_path, blobs):
    settings = ServerSettings(
        database_url=f"sqlite:///{tmp_path}/missing/dir/x.db",
        embedded_worker=False,
        auto_migrate=False,
    )
    app = create_app(settings, blobs=blobs)
    assert app.test_client().get("/ready").status_code == 503


def test_embedded_worker_thread_closes_rounds(db_url, blobs, clock):
    settings = ServerSettings(
        database_url=db_url, embedded_worker=True, auto_migrate=False, worker_interval_seconds=0.05
    )
    app = create_app(settings, blobs=blobs, clock=clock)
    thread, stop = app.extensions["fcp_worker"]
    try:
        assert thread.daemon and thread.is_alive()
        api = Api(app.test_client())
        api.open_training(testkit.training_task(report_goal=1, rounds=1))
        api.contribute()
        done = threading.Event()
        for _ in range(200):  # wait for the background loop, without asserting on timing
            if api.get_task(1).completed_iterations == 1:
                done.set()
                break
            stop.wait(0.05)
        assert done.is_set()
    finally:
        stop.set()
        thread.join(timeout=30)
        app.extensions["fcp"].database.dispose()


def test_cli_db_upgrade_tokens_tasks_and_worker(tmp_path, monkeypatch, capsys, blobs, clock):
    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("FCP_DATABASE_URL", url)
    monkeypatch.setenv("FCP_BLOB_URL", (tmp_path / "blobs").as_uri())
    monkeypatch.setenv("FCP_LOG_FORMAT", "text")

    assert cli.main(["db", "upgrade"]) == 0
    assert cli.main(["tokens", "issue", "--label", "dev"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    database = db.connect(url)
    with database.sessions() as session:
        assert session.scalar(select(DeviceToken.label)) == "dev"
    database.dispose()
    assert len(token) >= 32

    app = create_app(
        ServerSettings(database_url=url, embedded_worker=False, auto_migrate=False),
        blobs=blobs,
        clock=clock,
    )
    Api(app.test_client()).open_training()
    app.extensions["fcp"].database.dispose()

    assert cli.main(["tasks", "list"]) == 0
    assert f"{POP}\t1\tTRAINING\tOPEN" in capsys.readouterr().out
    assert cli.main(["tasks", "show", POP, "1"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "OPEN"
    assert cli.main(["tasks", "cancel", POP, "1"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "CANCELED"
    assert cli.main(["tasks", "show", POP, "9"]) == 1
    assert "not found" in capsys.readouterr().err
    assert cli.main(["worker", "--once"]) == 0
    assert "rounds_closed" in capsys.readouterr().out
