"""B3: device update ingest over HTTP against a bare WSGI app that only reads the body.

Both sides run under the same gunicorn config (2 gthread workers x 4 threads). Ours is the
real upload endpoint: bounded gunzip (gzip on), `decode_update` validation, the create-only
blob write and the counting transaction on SQLite; the devices were checked in and reported
COMPLETED before the clock starts. The load comes from 2 spawned processes x 2 threads that
PUT pre-built update bodies (MB/s counts uncompressed update bytes, identical on both sides).

The bare app stores nothing, while every accepted update must be on disk before it is
acknowledged. A third figure therefore compares ingest with gzip off against the disk itself:
the same number of update-sized files written by as many threads as the load has, each one
written, fsynced, renamed into a new directory and that directory fsynced, next to the
server's blob directory, once before and once after the HTTP runs (the shared disk's speed
drifts; the faster is kept). That is the least an upload that survives a crash costs on this
machine.
"""

import concurrent.futures
import os
import pathlib
import tempfile
import time

import httpx
import numpy as np

from tools.benchmarks import loadgen, servers, workload
from tools.benchmarks.figures import Figure

POP = "bench_ingest"
LOAD_PROCESSES = 2
LOAD_THREADS = 2


def _jobs(url: str, paths: list[str], shapes: workload.Shapes, gzip: bool) -> list[loadgen.Job]:
    share = [tuple(paths[k::LOAD_PROCESSES]) for k in range(LOAD_PROCESSES)]
    return [
        loadgen.Job(
            base_url=url,
            method="PUT",
            paths=part,
            threads=LOAD_THREADS,
            body="update",
            ok_status=204,
            gzip=gzip,
            shapes=shapes,
            seed=k,
        )
        for k, part in enumerate(share)
    ]


def _measure(url: str, paths: list[str], shapes: workload.Shapes, gzip: bool) -> float:
    outcomes = loadgen.run(_jobs(url, paths, shapes, gzip))
    failed = sum(o.failed for o in outcomes)
    if failed:
        raise RuntimeError(f"{failed} of {len(paths)} uploads failed against {url}")
    return loadgen.rate(outcomes, "bytes") / 1e6


def _durable_write(directory: pathlib.Path, data: bytes) -> None:
    directory.mkdir()
    tmp = directory / ".tmp"
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(directory / "gradient")
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_rate(root: pathlib.Path, shapes: workload.Shapes, n: int) -> float:
    """MB/s of n durable update-sized file writes from the load's number of threads."""
    rng = np.random.default_rng(7)
    bodies = [workload.update_bytes(workload.update_arrays(shapes, rng)) for _ in range(4)]
    root.mkdir()
    threads = LOAD_PROCESSES * LOAD_THREADS
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: _durable_write(root / str(i), bodies[i % 4]), range(n)))
    elapsed = time.perf_counter() - start
    return sum(len(bodies[i % 4]) for i in range(n)) / elapsed / 1e6


def run(quick: bool) -> list[Figure]:
    """Ours vs the bare app, gzip off and on."""
    shapes, n = (workload.TINY, 20) if quick else (workload.EMNIST_CNN, 60)
    figures = []
    with tempfile.TemporaryDirectory(prefix="fcp-b3-") as tmp:
        root = pathlib.Path(tmp)
        env = servers.server_env(servers.sqlite_database(root), root / "blobs")
        log = root / "gunicorn.log"
        # The shared disk's speed drifts: measured before and after the HTTP runs, best kept.
        disk_before = _disk_rate(root / "disk-before", shapes, n)
        ours: dict[bool, float] = {}
        with (
            servers.gunicorn("fcp_server.app:create_app()", env, log) as (url, _),
            httpx.Client(base_url=url, timeout=60) as http,
        ):
            servers.register_task(
                http,
                POP,
                workload.training_task(report_goal=2 * n, capacity=2 * n),
                workload.server_plan(shapes, report_goal=2 * n),
                workload.client_plan(shapes),
                workload.initial_checkpoint(shapes, np.random.default_rng(0)),
            )
            paths = servers.prepare_uploads(http, POP, 2 * n)
            for k, gz in enumerate((False, True)):
                ours[gz] = _measure(url, paths[k * n : (k + 1) * n], shapes, gz)
        with servers.gunicorn("tools.benchmarks.bare_apps:read_body_app", env, log) as (url, _):
            fake = [f"/upload/{i}" for i in range(n)]
            bare = {gz: _measure(url, fake, shapes, gz) for gz in (False, True)}
        disk = max(disk_before, _disk_rate(root / "disk-after", shapes, n))
    for gz in (False, True):
        figures.append(
            Figure(
                benchmark="B3",
                name=f"upload ingest {workload.size_label(shapes)} x {n}, gzip "
                + ("on" if gz else "off"),
                ours=ours[gz],
                unit="MB/s",
                baseline=bare[gz],
                baseline_name="bare WSGI app reading the body, same gunicorn config",
                target_on="ratio",
                target=0.8,
                direction="higher",
                notes="server: gunicorn 2 workers x 4 threads (SQLite, local blobs); load: "
                f"{LOAD_PROCESSES} processes x {LOAD_THREADS} threads; all on the same 2 cores",
            )
        )
    figures.append(
        Figure(
            benchmark="B3",
            name=f"upload ingest {workload.size_label(shapes)} x {n}, gzip off, vs the disk",
            ours=ours[False],
            unit="MB/s",
            baseline=disk,
            baseline_name="the same bytes written durably to files (write, fsync, rename, "
            "directory fsync), same thread count; best of one run before and one after",
            target_on="ratio",
            target=0.8,
            direction="higher",
            notes="the physical limit of an acknowledged upload on this machine's disk; the "
            "bare app above stores nothing",
        )
    )
    return figures
