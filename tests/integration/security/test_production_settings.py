"""Production settings: the server refuses to start without an admin key and device tokens,
serves with them (under gunicorn, several workers), and stores only hashes of device tokens."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from fcp_server.app import create_app
from fcp_server.protos import task_assignments_pb2
from fcp_server.services import auth, rate_limits
from fcp_server.settings import PRODUCTION_RATE_LIMIT, ServerSettings, SettingsError
from fcp_server.storage import db as fcp_db
from tests.integration.security.security_kit import device
from tests.integration.server import testkit

ROOT = Path(__file__).resolve().parents[3]
GUNICORN_CONF = ROOT / "configs" / "gunicorn.conf.py"
ADMIN_KEY = "admin-key-for-tests"


def _env(db_url: str, blob_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCP_")}
    env.update(
        FCP_ENV="production",
        FCP_DATABASE_URL=db_url,
        FCP_BLOB_URL=blob_dir.as_uri(),
        FCP_LOG_FORMAT="text",
        **extra,
    )
    return env


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({}, "FCP_ADMIN_API_KEY"),
        ({"FCP_ADMIN_API_KEY": ""}, "FCP_ADMIN_API_KEY"),
        ({"FCP_ADMIN_API_KEY": ADMIN_KEY, "FCP_DEVICE_AUTH": "false"}, "FCP_DEVICE_AUTH"),
    ],
)
def test_the_app_refuses_production_without_admin_key_or_device_tokens(env, missing):
    with pytest.raises(SettingsError, match=missing):
        create_app(ServerSettings.from_env({"FCP_ENV": "production", **env}))


def test_production_defaults_turn_security_on_and_demo_stays_open():
    prod = ServerSettings.from_env({"FCP_ENV": "production", "FCP_ADMIN_API_KEY": ADMIN_KEY})
    assert prod.device_auth and prod.admin_api_key == ADMIN_KEY
    assert prod.rate_limit_requests == PRODUCTION_RATE_LIMIT > 0
    assert not prod.embedded_worker and not prod.auto_migrate
    demo = ServerSettings.from_env({})
    assert (demo.device_auth, demo.admin_api_key, demo.rate_limit_requests) == (False, None, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gunicorn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would block the server
        return subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, ended as a whole below
        )


def _stop(proc: subprocess.Popen[bytes], log: Path) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return log.read_text(errors="replace")


def test_gunicorn_refuses_to_start_in_production_without_an_admin_key(db_url, tmp_path):
    env = _env(db_url, tmp_path, FCP_BIND=f"127.0.0.1:{_free_port()}", FCP_WEB_WORKERS="1")
    log = tmp_path / "gunicorn.log"
    proc = _gunicorn(env, log)
    try:
        code = proc.wait(timeout=120)
    finally:
        output = _stop(proc, log)
    assert code != 0
    assert "FCP_ADMIN_API_KEY" in output


def _call(url: str, *, method: str = "GET", data: bytes | None = None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited early: {_stop(proc, log)}")
        try:
            if _call(f"{base}/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("gunicorn did not become ready")


def _issue_token(db_url: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCP_")}
    out = subprocess.run(
        [sys.executable, "-m", "fcp_server.cli", "--database-url", db_url, "tokens", "issue"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def _database_text(db_url: str) -> str:
    """Every value of every row of every table, as one string."""
    database = fcp_db.connect(db_url)
    try:
        parts = []
        with database.engine.connect() as conn:
            for table in inspect(conn).get_table_names():
                rows = conn.execute(text(f'SELECT * FROM "{table}"')).all()
                parts.extend(repr(tuple(row)) for row in rows)
        return "\n".join(parts)
    finally:
        database.dispose()


@pytest.mark.slow
def test_production_server_under_gunicorn_enforces_tokens_key_and_shared_rate_limit(
    db_url, tmp_path
):
    limit = 4
    port = _free_port()
    env = _env(
        db_url,
        tmp_path,
        FCP_ADMIN_API_KEY=ADMIN_KEY,
        FCP_BIND=f"127.0.0.1:{port}",
        FCP_WEB_WORKERS="2",
        FCP_WEB_THREADS="2",
        FCP_RATE_LIMIT_REQUESTS=str(limit),
        FCP_RATE_LIMIT_WINDOW_SECONDS="3600",
    )
    token = _issue_token(db_url)
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "gunicorn.log"
    proc = _gunicorn(env, log)
    try:
        _wait_ready(base, proc, log)
        tasks_url = f"{base}/taskmanagement/v1/population/{testkit.POP}/tasks"
        assert _call(tasks_url)[0] == 401
        assert _call(tasks_url, headers={"x-api-key": "wrong"})[0] == 401
        assert _call(tasks_url, headers={"x-api-key": ADMIN_KEY})[0] == 200

        checkin_url = f"{base}/taskassignment/v1/population/{testkit.POP}:create-task-assignment"
        req = task_assignments_pb2.CreateTaskAssignmentRequest()
        req.client_version.version_code = "100"
        body = req.SerializeToString()
        proto = {"Content-Type": testkit.PROTO}
        assert _call(checkin_url, method="POST", data=body, headers=proto)[0] == 401
        signed = {**proto, auth.DEVICE_TOKEN_HEADER: token}
        started = time.time()
        statuses, headers = [], {}
        for _ in range(2 * limit + 1):
            status, headers, _ = _call(checkin_url, method="POST", data=body, headers=signed)
            statuses.append(status)
            if status == 429:
                break
        same_window = rate_limits.window_start(started, 3600) == rate_limits.window_start(
            time.time(), 3600
        )
    finally:
        _stop(proc, log)
    # Two workers, one budget: the counter lives in the database.
    assert statuses[-1] == 429, statuses
    if same_window:
        assert statuses == [200] * limit + [429]
    assert 1 <= int(headers["Retry-After"]) <= 3600
    stored = _database_text(db_url)
    assert token not in stored
    assert auth.token_digest(token) in stored


def test_the_database_never_holds_a_plaintext_token(make_app, tokens, worker, db_url):
    app = make_app(device_auth=True, rate_limit_requests=100)
    testkit.Api(app.test_client()).open_training(testkit.training_task(report_goal=2))
    issued = tokens(app, 2)
    for token in issued:
        device(app, token).contribute(testkit.update_bytes())
    assert worker.tick().rounds_closed == 1
    stored = _database_text(db_url)
    for token in issued:
        assert token not in stored
        assert stored.count(auth.token_digest(token)) >= 3  # token, assignment, rate counter
