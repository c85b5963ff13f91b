"""B3: device update ingest over HTTP against a bare WSGI app that only reads the body.

Both sides run under the same gunicorn config (2 gthread workers x 4 threads). Ours is the
real upload endpoint: bounded gunzip (gzip on), `decode_update` validation, the create-only
blob write and the counting transaction on SQLite; the devices were checked in and reported
COMPLETED before the clock starts. The load comes from 2 spawned processes x 2 threads that
PUT pre-built update bodies (MB/s counts uncompressed update bytes, identical on both sides).
"""

import pathlib
import tempfile

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


def run(quick: bool) -> list[Figure]:
    """Ours vs the bare app, gzip off and on."""
    shapes, n = (workload.TINY, 20) if quick else (workload.EMNIST_CNN, 60)
    figures = []
    with tempfile.TemporaryDirectory(prefix="fcp-b3-") as tmp:
        root = pathlib.Path(tmp)
        env = servers.server_env(servers.sqlite_database(root), root / "blobs")
        log = root / "gunicorn.log"
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
    return figures
