"""B6: server peak RSS with 100 vs 1000 clients per round (streaming aggregation).

For each round size a fresh server (gunicorn, 2 workers, SQLite, local blobs) receives every
update over HTTP from a spawned load process, then `fcp-server worker --once` closes the round
in a process of its own. Peak RSS is the kernel's high-water mark (VmHWM): of each gunicorn
worker (read before they stop) and of the worker process (read by itself at exit). Not the
child's ru_maxrss from wait4: Python spawns with vfork, and at exec Linux folds the borrowed
parent's peak RSS into the child's ru_maxrss, so it reported the benchmark runner's own peak
(4.7 GiB after B1/B2), not the worker's. Memory must not grow with the number of clients:
updates are validated and stored one at a time and the round close holds one update plus the
running sums.
"""

import pathlib
import subprocess
import sys
import tempfile

import httpx
import numpy as np

from tools.benchmarks import loadgen, servers, workload
from tools.benchmarks.figures import Figure

POP = "bench_rss"


# Runs `fcp-server worker --once` in this interpreter and writes its own VmHWM (in KiB) to
# the file named by argv[1] at exit, whatever the exit status.
_REPORT_PEAK = """
import atexit, pathlib, runpy, sys
out = pathlib.Path(sys.argv[1])
def report():
    status = pathlib.Path("/proc/self/status").read_text().splitlines()
    out.write_text(next(x.split()[1] for x in status if x.startswith("VmHWM:")))
atexit.register(report)
sys.argv = ["fcp-server", "worker", "--once"]
runpy.run_module("fcp_server.cli", run_name="__main__", alter_sys=True)
"""


def _close_round_peak(env: dict[str, str], log: pathlib.Path) -> int:
    """Runs one worker tick in a child process; returns its peak RSS in bytes."""
    peak_file = log.with_suffix(".peak")
    cmd = [sys.executable, "-c", _REPORT_PEAK, str(peak_file)]
    with log.open("ab") as out:
        returncode = subprocess.run(
            cmd, cwd=servers.ROOT, env=env, stdout=out, stderr=out
        ).returncode
    if returncode != 0:
        raise RuntimeError(f"worker --once failed; log:\n{log.read_text()[-2000:]}")
    if "'rounds_closed': 1" not in log.read_text():
        raise RuntimeError(f"worker --once closed no round; log:\n{log.read_text()[-2000:]}")
    return int(peak_file.read_text()) * 1024  # VmHWM is in KiB


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
            "VmHWM of `fcp-server worker --once` (its own process, read at its exit)",
        ),
    ]
