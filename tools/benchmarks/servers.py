"""Server processes for the HTTP benchmarks: gunicorn, throwaway databases, task setup.

Every server runs as its own process group under the repository's gunicorn config
(configs/gunicorn.conf.py, gthread workers), and is always stopped when the `with` block ends.
The PostgreSQL benchmarks create a database of their own and drop it afterwards.
"""

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Protocol

import httpx
import psutil
import psycopg
from sqlalchemy.engine import make_url

from fcp_server.protos import common_pb2, plan_pb2, task_assignments_pb2, task_pb2
from fcp_server.storage import db

ROOT = pathlib.Path(__file__).resolve().parents[2]
GUNICORN_CONF = ROOT / "configs" / "gunicorn.conf.py"
PROTO = {"Content-Type": "application/x-protobuf", "Accept": "application/x-protobuf"}
POSTGRES_ADMIN_URL = os.environ.get(
    "FCP_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
WEB_WORKERS = 2
WEB_THREADS = 4


class Answer(Protocol):
    """The part of an HTTP response the setup helpers read (httpx.Response has it)."""

    @property
    def status_code(self) -> int: ...  # noqa: D102

    @property
    def content(self) -> bytes: ...  # noqa: D102

    def raise_for_status(self) -> object: ...  # noqa: D102


class Http(Protocol):
    """The part of an HTTP client the setup helpers call (httpx.Client has it)."""

    def post(  # noqa: D102
        self, url: str, *, content: bytes = ..., headers: dict[str, str] | None = ...
    ) -> Answer: ...

    def put(  # noqa: D102
        self, url: str, *, content: bytes = ..., headers: dict[str, str] | None = ...
    ) -> Answer: ...


def free_port() -> int:
    """A currently free loopback TCP port."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(database_url: str, blob_dir: pathlib.Path) -> dict[str, str]:
    """FCP_* variables of a benchmark server (demo mode, no embedded worker)."""
    blob_dir.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "FCP_ENV": "demo",
        "FCP_DATABASE_URL": database_url,
        "FCP_BLOB_URL": blob_dir.as_uri(),
        "FCP_EMBEDDED_WORKER": "false",
        "FCP_AUTO_MIGRATE": "false",
        "FCP_LOG_FORMAT": "text",
        "FCP_LOG_LEVEL": "WARNING",
    }


def _wait_listening(url: str, proc: subprocess.Popen[bytes], log: pathlib.Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited early; log:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            httpx.get(url + "/healthz", timeout=2)  # any answer means it is listening
            return
        time.sleep(0.2)
    raise RuntimeError(f"gunicorn at {url} did not start; log:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def gunicorn(app: str, env: dict[str, str], log: pathlib.Path) -> Iterator[tuple[str, int]]:
    """Serves `app` with the project's gunicorn config, 2 workers; yields (url, master pid)."""
    port = free_port()
    run_env = {
        **env,
        "FCP_BIND": f"127.0.0.1:{port}",
        "FCP_WEB_WORKERS": str(WEB_WORKERS),
        "FCP_WEB_THREADS": str(WEB_THREADS),
    }
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), app]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=run_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_listening(url, proc, log)
        yield url, proc.pid
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Terminates a process started in its own session, and everything in that session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def worker_pids(master_pid: int) -> list[int]:
    """The gunicorn worker processes of a master."""
    return [p.pid for p in psutil.Process(master_pid).children()]


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size so far (Linux VmHWM)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A throwaway PostgreSQL database (created, migrated to head, dropped); yields its URL."""
    base = make_url(POSTGRES_ADMIN_URL)
    name = f"fcp_bench_{uuid.uuid4().hex[:12]}"
    conninfo = (
        f"host={base.host} port={base.port or 5432} user={base.username} dbname={base.database}"
    )
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        db.upgrade_schema(url)
        yield url
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite_database(directory: pathlib.Path) -> str:
    """A migrated SQLite database file in `directory`; returns its URL."""
    url = f"sqlite:///{directory / 'fcp.sqlite'}"
    db.upgrade_schema(url)
    return url


def register_task(
    http: Http,
    pop: str,
    task: task_pb2.Task,
    plan: plan_pb2.ServerPlan,
    client_plan: plan_pb2.ClientOnlyPlan,
    checkpoint: bytes,
) -> int:
    """Creates a task over the task-management API, uploads its artifacts, opens it."""
    resp = http.post(
        f"/taskmanagement/v1/population/{pop}:create-task",
        content=task_pb2.CreateTaskRequest(task=task).SerializeToString(),
        headers=PROTO,
    )
    resp.raise_for_status()
    created = task_pb2.CreateTaskResponse.FromString(resp.content).task
    octet = {"Content-Type": "application/octet-stream"}
    for url, data in (
        (created.init_checkpoint_url[0], checkpoint),
        (created.server_phase_url[0], plan.SerializeToString()),
        (created.client_only_plan_url[0], client_plan.SerializeToString()),
    ):
        http.put(url, content=data, headers=octet).raise_for_status()
    opened = http.post(
        f"/taskmanagement/v1/population/{pop}/tasks/{created.task_id}:open", headers=PROTO
    )
    opened.raise_for_status()
    return int(created.task_id)


def prepare_uploads(http: Http, pop: str, count: int) -> list[str]:
    """Checks `count` devices in and reports them COMPLETED; returns their upload URLs."""
    checkin = task_assignments_pb2.CreateTaskAssignmentRequest()
    checkin.client_version.version_code = "100"
    checkin.resource_capabilities.supported_compression_formats.append(
        common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP
    )
    report = task_assignments_pb2.ReportResultRequest(
        result=task_assignments_pb2.ReportResultRequest.COMPLETED
    )
    locations = []
    for _ in range(count):
        resp = http.post(
            f"/taskassignment/v1/population/{pop}:create-task-assignment",
            content=checkin.SerializeToString(),
            headers=PROTO,
        )
        if resp.status_code != 201:
            raise RuntimeError(f"check-in failed: {resp.status_code} {resp.content[:200]!r}")
        a = task_assignments_pb2.CreateTaskAssignmentResponse.FromString(
            resp.content
        ).task_assignment
        base = (
            f"/taskassignment/v1/population/{a.population_name}/task/{a.task_id}"
            f"/aggregation/{a.aggregation_id}/task-assignment/{a.assignment_id}"
        )
        answer = http.put(
            f"{base}:report-result", content=report.SerializeToString(), headers=PROTO
        )
        answer.raise_for_status()
        instruction = task_assignments_pb2.ReportResultResponse.FromString(
            answer.content
        ).upload_instruction
        locations.append(instruction.upload_location)
    return locations
