"""The server under load as it is deployed: gunicorn web workers plus `fcp-server worker`s.

Starts `gunicorn -c configs/gunicorn.conf.py` (N gthread workers, no embedded worker loop, no
migration) and M `fcp-server worker` processes on one database and one local blob directory,
each in a process group of its own so that stopping it ends its children too. Gunicorn's
access log is written one request per line (`ACCESS status method path ms`) so the test can
count the server's answers itself instead of trusting the clients; application logs are JSON
so errors can be picked out by level.
"""

import collections
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
ACCESS_FORMAT = "ACCESS %(s)s %(m)s %(U)s %(M)s"
_GUNICORN_PROBLEM = re.compile(r"\[(ERROR|CRITICAL)\]")


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """How many processes serve, and the server settings they share."""

    database_url: str
    blob_dir: Path
    log_dir: Path
    web_workers: int = 4
    web_threads: int = 4
    workers: int = 2
    # Further FCP_* settings (timeouts, worker interval).
    settings: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Stack:
    """A running server: its URL and the processes serving it."""

    url: str
    web: subprocess.Popen[bytes]
    workers: tuple[subprocess.Popen[bytes], ...]
    config: StackConfig

    def alive(self) -> bool:
        return all(p.poll() is None for p in (self.web, *self.workers))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _environment(cfg: StackConfig, bind: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FCP_")}
    env.update(
        {
            # The demo environment: open device API, no admin key; it sets no request limits.
            "FCP_ENV": "demo",
            "FCP_DATABASE_URL": cfg.database_url,
            "FCP_BLOB_URL": cfg.blob_dir.as_uri(),
            "FCP_EMBEDDED_WORKER": "false",
            "FCP_AUTO_MIGRATE": "false",
            "FCP_LOG_FORMAT": "json",
            "FCP_BIND": bind,
            "FCP_WEB_WORKERS": str(cfg.web_workers),
            "FCP_WEB_THREADS": str(cfg.web_threads),
            **dict(cfg.settings),
        }
    )
    return env


def _start(cmd: list[str], env: dict[str, str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    with out.open("ab") as stdout, err.open("ab") as stderr:
        return subprocess.Popen(
            cmd, env=env, stdout=stdout, stderr=stderr, cwd=ROOT, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group we created, SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Gunicorn's workers are in the same group; make sure none outlives its master.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited early with code {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def running(cfg: StackConfig) -> Iterator[Stack]:
    """Starts the web server and the workers; always stops all of them when the block ends."""
    port = free_port()
    env = _environment(cfg, f"127.0.0.1:{port}")
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen[bytes]] = []
    try:
        web_cmd = [
            str(BIN / "gunicorn"),
            "-c",
            str(ROOT / "configs" / "gunicorn.conf.py"),
            "--access-logformat",
            ACCESS_FORMAT,
        ]
        started.append(_start(web_cmd, env, cfg.log_dir / "access.log", cfg.log_dir / "web.log"))
        for i in range(cfg.workers):
            log = cfg.log_dir / f"worker-{i}.log"
            started.append(_start([str(BIN / "fcp-server"), "worker"], env, log, log))
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, started)
        yield Stack(url=url, web=started[0], workers=tuple(started[1:]), config=cfg)
    finally:
        for proc in started:
            _stop(proc)


@dataclasses.dataclass(frozen=True)
class AccessSummary:
    """The server's own count of its answers, from gunicorn's access log."""

    # (endpoint, status) -> count
    counts: dict[tuple[str, int], int]
    # endpoint -> request times in ms
    times_ms: dict[str, list[float]]

    def total(self, endpoint: str | None = None) -> int:
        return sum(n for (e, _), n in self.counts.items() if endpoint in (None, e))

    def server_errors(self) -> int:
        return sum(n for (_, status), n in self.counts.items() if status >= 500)


def endpoint_of(path: str) -> str:
    """A short endpoint name for a request path."""
    if path.startswith("/taskmanagement/"):
        return "admin"
    for suffix, name in (
        (":create-task-assignment", "checkin"),
        (":report-result", "report"),
        (":upload", "upload"),
        ("/client_only_plan", "plan"),
        ("/client_checkpoint", "checkpoint"),
    ):
        if path.endswith(suffix):
            return name
    return "other"


def read_access_log(path: Path) -> AccessSummary:
    counts: collections.Counter[tuple[str, int]] = collections.Counter()
    times: dict[str, list[float]] = collections.defaultdict(list)
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) != 5 or parts[0] != "ACCESS":
            continue
        endpoint = endpoint_of(parts[3])
        counts[(endpoint, int(parts[1]))] += 1
        times[endpoint].append(float(parts[4]))
    return AccessSummary(counts=dict(counts), times_ms=dict(times))


def logged_errors(log_dir: Path) -> list[str]:
    """ERROR/CRITICAL lines of the application (JSON) and gunicorn logs."""
    found = []
    for path in sorted(log_dir.glob("*.log")):
        if path.name == "access.log":
            continue
        for line in path.read_text(errors="replace").splitlines():
            level = ""
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    level = str(json.loads(line).get("level", ""))
            elif _GUNICORN_PROBLEM.search(line):
                level = "ERROR"
            if level in ("ERROR", "CRITICAL"):
                found.append(f"{path.name}: {line[:2000]}")
    return found
