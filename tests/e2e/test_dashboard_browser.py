"""The dashboard in a real browser: a live server process, Debian's headless Chromium, real rounds.

Rounds are driven in-process through the HTTP API on a SQLite file; a separate server process
(werkzeug on a free loopback port) serves that database with an admin key, and Chromium loads
/dashboard?key=... . The page's script must fetch data.json with the key and draw the SVG
charts: the dumped DOM must hold them and the screenshot must show their stroke colours.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from matplotlib import image

from fcp_server.app import create_app, worker_deps
from fcp_server.protos import task_builder_pb2
from fcp_server.settings import ServerSettings
from fcp_server.storage.blobs import make_blob_store
from fcp_server.worker import Worker
from tests.integration.server import testkit
from tests.integration.server.testkit import POP, Api
from tools import plot_operations

pytestmark = pytest.mark.slow

KEY = "dash-key"
REPO = Path(__file__).resolve().parents[2]
# Stroke colours of static/dashboard.js's first three metric series (loss, num_examples,
# epsilon); green is also the check-ins chart's UPLOAD_COMPLETED line.
CHART_COLORS = ("#1f77b4", "#d62728", "#2ca02c")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
    "--virtual-time-budget=5000",
)
# The live server: the real app factory plus the dashboard blueprint (until create_app
# registers it), on an OS-chosen loopback port that is printed for the test to read.
SERVER_SCRIPT = """
from werkzeug.serving import make_server
from fcp_server.api import dashboard
from fcp_server.app import create_app
app = create_app()
if "dashboard" not in app.blueprints:
    app.register_blueprint(dashboard.blueprint)
server = make_server("127.0.0.1", 0, app, threaded=True)
print(server.server_port, flush=True)
server.serve_forever()
"""


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is required under CI=true (tools/bootstrap.sh installs it)")
        pytest.skip("chromium is not installed")
    return found


@pytest.fixture
def store(tmp_path, sqlite_template):
    db_file = tmp_path / "fcp.db"
    shutil.copyfile(sqlite_template, db_file)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    return f"sqlite:///{db_file}", blobs.as_uri()


def drive_rounds(db_url: str, blob_url: str) -> None:
    """Four completed DP rounds with falling loss, then one check-in of round 5."""
    settings = ServerSettings(
        database_url=db_url, blob_url=blob_url, embedded_worker=False, auto_migrate=False
    )
    app = create_app(settings, blobs=make_blob_store(blob_url))
    try:
        api = Api(app.test_client())
        worker = Worker(worker_deps(app.extensions["fcp"]))
        plan = testkit.server_plan(
            report_goal=2,
            dp_type=task_builder_pb2.DpAggregator.FIXED_GAUSSIAN,
            noise_multiplier=1.0,
            clip_norm=1.0,
            population_size=1000,
            target_epsilon=10.0,
        )
        api.open_training(testkit.training_task(report_goal=2, rounds=6), plan=plan)
        for r in range(4):
            for device in range(2):
                api.contribute(testkit.update_bytes(0.05, 0.05, loss=(8.0 - 2 * r + device, 10.0)))
            assert worker.tick().rounds_closed == 1
        api.assign()
    finally:
        app.extensions["fcp"].database.dispose()


def _read_port(proc: subprocess.Popen[str]) -> int:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=60)
    if not line or not line[0].strip().isdigit():
        proc.kill()
        raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
    return int(line[0])


@pytest.fixture
def live_server(store, tmp_path):
    db_url, blob_url = store
    drive_rounds(db_url, blob_url)
    env = {
        **os.environ,
        "FCP_DATABASE_URL": db_url,
        "FCP_BLOB_URL": blob_url,
        "FCP_ADMIN_API_KEY": KEY,
        "FCP_EMBEDDED_WORKER": "false",
        "FCP_AUTO_MIGRATE": "false",
        "FCP_LOG_FORMAT": "text",
    }
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{_read_port(proc)}"
        assert httpx.get(url + "/ready", timeout=30).status_code == 200
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()


def run_chromium(args: list[str], profile: Path) -> str:
    """Runs headless Chromium to completion in its own process group; returns its stdout."""
    proc = subprocess.Popen(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the browser and its helpers only
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    return out


def colour_pixels(img: np.ndarray, hex_color: str, tolerance: float = 0.06) -> int:
    rgb = np.array([int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img[..., :3] - rgb).max(axis=-1) < tolerance).sum())


def test_dashboard_renders_charts_in_headless_chromium(live_server, tmp_path):
    chromium()
    page = f"{live_server}/dashboard?key={KEY}"
    assert httpx.get(f"{live_server}/dashboard").status_code == 401  # the key is needed

    dom = run_chromium(["--dump-dom", page], tmp_path / "profile-dom")
    shot = tmp_path / "dashboard.png"
    run_chromium([f"--screenshot={shot}", page], tmp_path / "profile-shot")

    # The script ran: it fetched data.json with the key and drew one SVG per metric series
    # plus the check-ins chart (the server-rendered page has no SVG at all).
    assert "Refresh failed" not in dom
    data = httpx.get(f"{live_server}/dashboard/data.json", headers={"x-api-key": KEY}).json()
    series = len(data["tasks"][0]["metrics"])
    assert series >= 5
    assert dom.count('<svg class="chart"') == series + 1
    assert dom.count("<polyline") >= series + 1
    assert "client_work/train/loss" in dom
    assert f"{POP} / task 1" in dom
    assert "assigned 1, reported 0 / 2" in dom
    # The screenshot shows the charts' strokes.
    img = image.imread(str(shot))
    assert img.shape[:2] == (900, 1280)
    for colour in CHART_COLORS:
        assert colour_pixels(img, colour) > 150, colour


def test_plot_operations_reads_the_live_server(live_server, tmp_path):
    out = tmp_path / "plots"
    rc = plot_operations.main(["--server", live_server, "--api-key", KEY, "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "assignments_per_minute.png",
        "round_duration.png",
        "rounds_over_time.png",
    ]
