"""A real FCP deployment for end-to-end tests, as the README's main command runs one.

`fcp-server db upgrade` on a SQLite file, then gunicorn with configs/gunicorn.conf.py (two web
workers, no embedded worker) and `fcp-server worker`, which closes the rounds, all on a free
loopback port with a `file://` blob directory. Both processes are stopped when the context
ends, whatever happened inside it.
"""

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from fcp_server.storage.blobs import BlobStore, make_blob_store

ROOT = Path(__file__).resolve().parents[2]
_READY_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class Stack:
    """A running deployment."""

    url: str  # http://127.0.0.1:<port>
    database_url: str  # the server's SQLAlchemy URL (its records)
    blobs: BlobStore  # the server's blob store (plans, checkpoints, metrics, uploads)


def free_port() -> int:
    """A currently free loopback TCP port."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminates a child process and whatever it started (killing after 20 s), and waits.

    The descendants are listed first: a process killed before it could end its own children
    (gunicorn's workers, TFF's worker_binary) would leave them running.
    """
    if proc.poll() is not None:
        return
    descendants: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        descendants = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(descendants, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], log: Path) -> None:
    deadline = time.monotonic() + _READY_SECONDS
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"the server exited early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not ready within {_READY_SECONDS} s")
        time.sleep(0.3)


@contextlib.contextmanager
def running_stack(workdir: Path) -> Iterator[Stack]:
    """Runs the deployment on `workdir` (database, blobs, server.log) until the block ends."""
    port = free_port()
    env = {
        **os.environ,
        "FCP_DATABASE_URL": f"sqlite:///{workdir / 'fcp.db'}",
        "FCP_BLOB_URL": (workdir / "blobs").as_uri(),
        "FCP_BIND": f"127.0.0.1:{port}",
        "FCP_WEB_WORKERS": "2",
        "FCP_EMBEDDED_WORKER": "false",
        "FCP_WORKER_INTERVAL_SECONDS": "0.2",
        "FCP_LOG_FORMAT": "text",
        "FCP_LOG_LEVEL": "WARNING",
    }
    (workdir / "blobs").mkdir()
    cli = [sys.executable, "-m", "fcp_server.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True)
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", "configs/gunicorn.conf.py"]
    procs: list[subprocess.Popen[bytes]] = []
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        try:
            for cmd in (gunicorn, [*cli, "worker"]):
                procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log))
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, procs, log_path)
            yield Stack(url, env["FCP_DATABASE_URL"], make_blob_store(env["FCP_BLOB_URL"]))
        finally:
            for proc in procs:
                stop(proc)
