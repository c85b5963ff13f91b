"""The real server processes: gunicorn (web) and `fcp-server worker`, killable with SIGKILL.

Each process is started in a process group of its own (in the test's session, so a check
script that ends the session's leftovers ends these too); the group holds it and every child
(gunicorn's master and workers). `kill` sends SIGKILL to that group by its id, exactly what a
lost machine does, and `stop_all` ends every group this object started. Each start may
arm fault points (`fcp_server.fault_points`) and gets its own fault log, so the caller can
tell which start a fired point belongs to.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[3]
_BIN = Path(sys.executable).parent
WEB, WORKER = "web", "worker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcesses:
    """Starts, kills and restarts the web server and the worker on one database and blob dir."""

    def __init__(self, env: dict[str, str], run_dir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._env = {
            **os.environ,
            **env,
            # The servers run the very source tree the test imported.
            "PYTHONPATH": str(REPO),
            "FCP_BIND": f"127.0.0.1:{self.port}",
            "FCP_EMBEDDED_WORKER": "false",
            "FCP_AUTO_MIGRATE": "false",
        }
        self._run_dir = run_dir
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = {WEB: 0, WORKER: 0}
        self.fault_logs: dict[str, Path] = {}

    def _command(self, kind: str) -> list[str]:
        if kind == WEB:
            return [str(_BIN / "gunicorn"), "-c", str(REPO / "configs" / "gunicorn.conf.py")]
        return [str(_BIN / "fcp-server"), "worker"]

    def start(self, kind: str, fault_spec: str = "") -> None:
        """Starts `kind` with the fault points `fault_spec` armed ("" arms none)."""
        self.starts[kind] += 1
        generation = self.starts[kind]
        log = self._run_dir / f"{kind}-{generation}.faults"
        self.fault_logs[kind] = log
        env = {**self._env, "FCP_FAULT_POINT": fault_spec, "FCP_FAULT_LOG": str(log)}
        out = open(self._run_dir / f"{kind}-{generation}.log", "wb")  # noqa: SIM115
        self._procs[kind] = subprocess.Popen(
            self._command(kind),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
        out.close()
        if kind == WEB:
            self._wait_ready()

    def _wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._procs[WEB].poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self._procs[WEB].returncode}")
            if self.fired(WEB) is not None:
                return  # devices reached an armed point first; the caller restarts it
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("gunicorn did not answer /healthz")

    def fired(self, kind: str) -> str | None:
        """The fault point that killed (a process of) the current start of `kind`, if any."""
        log = self.fault_logs.get(kind)
        if log is None or not log.exists():
            return None
        lines = log.read_text().splitlines()
        return lines[0].split()[0] if lines else None

    def exited(self, kind: str) -> bool:
        proc = self._procs.get(kind)
        return proc is not None and proc.poll() is not None

    def kill(self, kind: str) -> None:
        """SIGKILLs the process group of `kind` (gunicorn: master and workers) and reaps it."""
        proc = self._procs.pop(kind, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):  # the whole group is already gone
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for kind in list(self._procs):
            self.kill(kind)
