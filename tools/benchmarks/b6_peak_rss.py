"""B6: server peak RSS with 100 vs 1000 clients per round (streaming aggregation).

For each round size a fresh server (gunicorn, 2 workers, SQLite, local blobs) receives every
update over HTTP from a spawned load process, then `fcp-server worker --once` closes the round
in a process of its own. Peak RSS is the kernel's high-water mark: VmHWM of each gunicorn
worker (read before they stop) and ru_maxrss of the worker process (from wait4). Memory must
not grow with the number of clients: updates are validated and stored one at a time and the
round close holds one update plus the running sums.
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import httpx
import numpy as np

from tools.benchmarks import loadgen, servers, workload
from tools.benchmarks.figures import Figure

POP = "bench_rss"


def _close_round_peak(env: dict[str, str], log: pathlib.Path) -> int:
    """Runs one worker tick in a child process; returns its peak RSS in bytes."""
    cmd = [sys.executable, "-m", "fcp_server.cli", "worker", "--once"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=servers.ROOT, env=env, stdout=out, stderr=out)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"worker --once failed; log:\n{log.read_text()[-2000:]}")
    if "'rounds_closed': 1" not in log.read_text():
        raise RuntimeError(f"worker --once closed no round; log:\n{log.read_text()[-2000:]}")
    return int(usage.ru_maxrss) * 1024  # Linux reports KiB


def measure(shapes: workload.Shapes, n: int) -> tuple[int, int]:
    """(peak RSS of the web workers, peak RSS of the round-close worker) for n clients."""
    with tempfile.TemporaryDirectory(prefix="fcp-b6-") as tmp:
        root = pathlib.Path(tmp)
        env = servers.server_env(servers.sqlite_database(root), root / "blobs")
        with (
            servers.gunicorn("fcp_server.app:create_app()", env, root / "web.log") as (url, pid),
            httpx.Client(base_url=url, timeout=60) as http,
        ):
            servers.register_task(
                http,
                POP,
                workload.training_task(report_goal=n, capacity=n),
                workload.server_plan(shapes, report_goal=n),
                workload.client_plan(shapes),
                workload.initial_checkpoint(shapes, np.random.default_rng(0)),
            )
            paths = servers.prepare_uploads(http, POP, n)
            job = loadgen.Job(url, "PUT", tuple(paths), 4, "update", 204, shapes=shapes)
            (outcome,) = loadgen.run([job])
            if outcome.ok != n:
                raise RuntimeError(f"only {outcome.ok} of {n} uploads succeeded")
            web = max(servers.peak_rss_bytes(p) for p in servers.worker_pids(pid))
        close = _close_round_peak(env, root / "worker.log")
    return web, close


def run(quick: bool) -> list[Figure]:
    """Peak RSS at 1000 clients against 100 (quick: 100 against 10, tiny model)."""
    shapes, small, large = (workload.TINY, 10, 100) if quick else (workload.EMNIST_CNN, 100, 1000)
    web_small, close_small = measure(shapes, small)
    web_large, close_large = measure(shapes, large)
    mib = 1 << 20
    label = workload.size_label(shapes)

    def figure(what: str, ours: int, base: int, notes: str) -> Figure:
        return Figure(
            benchmark="B6",
            name=f"peak RSS {what}, {large} vs {small} clients ({label})",
            ours=ours / mib,
            unit="MiB",
            baseline=base / mib,
            baseline_name=f"the same process with {small} clients",
            target_on="ratio",
            target=1.1,
            direction="lower",
            notes=notes,
        )

    return [
        figure(
            "web worker",
            web_large,
            web_small,
            "max VmHWM over the 2 gunicorn workers; uploads from 1 spawned process x 4 threads "
            "on the same 2 cores",
        ),
        figure(
            "round close",
            close_large,
            close_small,
            "ru_maxrss of `fcp-server worker --once` (its own process)",
        ),
    ]
