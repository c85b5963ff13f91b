"""B5: round close time, last upload -> server checkpoint, client checkpoint and metrics written.

100 devices upload through the real upload path (Flask test client, SQLite, local blob
directory; not timed), which moves the round to AGGREGATING. The clock then runs over
`round_close.close_round` exactly as the worker calls it right after that last upload: claim,
stream the 100 updates from the blob store through the accumulator, noise and SGD, publish
the checkpoints and the metrics file, commit. The worker's polling interval
(FCP_WORKER_INTERVAL_SECONDS) would add to this in a deployment. The floor printed beside it
reads the same 100 blob files from disk and adds the arrays in float32 with numpy.
"""

import dataclasses
import pathlib
import tempfile
import time

import numpy as np
from flask.testing import FlaskClient

from fcp_server.app import create_app, worker_deps
from fcp_server.services import round_close
from fcp_server.settings import ServerSettings
from tools.benchmarks import servers, workload
from tools.benchmarks.figures import Figure
from tools.benchmarks.workload import Array

POP = "bench_close"
DISTINCT = 8


class _TestHttp:
    """`servers.Http` on a Flask test client, so the setup runs in this process."""

    def __init__(self, client: FlaskClient) -> None:
        self._client = client

    def post(
        self, url: str, *, content: bytes = b"", headers: dict[str, str] | None = None
    ) -> "_Answer":
        resp = self._client.post(url, data=content, headers=headers)
        return _Answer(resp.status_code, resp.get_data())

    def put(
        self, url: str, *, content: bytes = b"", headers: dict[str, str] | None = None
    ) -> "_Answer":
        resp = self._client.put(url, data=content, headers=headers)
        return _Answer(resp.status_code, resp.get_data())


@dataclasses.dataclass(frozen=True)
class _Answer:
    status_code: int
    content: bytes

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.content[:300]!r}")


def _upload_all(client: FlaskClient, shapes: workload.Shapes, n: int) -> list[list[Array]]:
    """Registers the task and uploads n updates through the real endpoints."""
    http = _TestHttp(client)
    rng = np.random.default_rng(0)
    servers.register_task(
        http,
        POP,
        workload.training_task(report_goal=n, capacity=n),
        workload.server_plan(shapes, report_goal=n),
        workload.client_plan(shapes),
        workload.initial_checkpoint(shapes, rng),
    )
    arrays = [workload.update_arrays(shapes, rng) for _ in range(DISTINCT)]
    bodies = [workload.update_bytes(a) for a in arrays]
    for i, path in enumerate(servers.prepare_uploads(http, POP, n)):
        resp = client.put(
            path, data=bodies[i % DISTINCT], headers={"Content-Type": "application/octet-stream"}
        )
        if resp.status_code != 204:
            raise RuntimeError(f"upload {i} failed: {resp.status_code} {resp.get_data()[:200]!r}")
    return arrays


def _floor_seconds(blob_dir: pathlib.Path, arrays: list[list[Array]], n: int) -> float:
    files = sorted(blob_dir.rglob("gradient.blob"))
    if len(files) != n:
        raise RuntimeError(f"expected {n} update blobs, found {len(files)}")
    started = time.perf_counter()
    sums = [np.zeros_like(a) for a in arrays[0]]
    for i, path in enumerate(files):
        path.read_bytes()
        for total, t in zip(sums, arrays[i % len(arrays)], strict=True):
            np.add(total, t, out=total)
    return time.perf_counter() - started


def measure(shapes: workload.Shapes, n: int) -> tuple[float, float]:
    """(close_round seconds, floor seconds) for one round of n updates."""
    with tempfile.TemporaryDirectory(prefix="fcp-b5-") as tmp:
        root = pathlib.Path(tmp)
        settings = ServerSettings(
            database_url=servers.sqlite_database(root),
            blob_url=(root / "blobs").as_uri(),
            embedded_worker=False,
            auto_migrate=False,
            log_format="text",
            log_level="WARNING",
        )
        (root / "blobs").mkdir()
        app = create_app(settings)
        try:
            arrays = _upload_all(app.test_client(), shapes, n)
            deps = worker_deps(app.extensions["fcp"])
            pending = round_close.aggregating_rounds(deps)
            if len(pending) != 1:
                raise RuntimeError(f"expected one AGGREGATING round, found {pending}")
            started = time.perf_counter()
            if not round_close.close_round(deps, pending[0]):
                raise RuntimeError("the round did not close")
            ours = time.perf_counter() - started
            floor = _floor_seconds(root / "blobs", arrays, n)
        finally:
            app.extensions["fcp"].database.dispose()
    return ours, floor


def run(quick: bool) -> list[Figure]:
    """Round close at 100 clients x 1.66M parameters (quick: 10 x tiny)."""
    shapes, n = (workload.TINY, 10) if quick else (workload.EMNIST_CNN, 100)
    ours, floor = measure(shapes, n)
    return [
        Figure(
            benchmark="B5",
            name=f"round close {workload.size_label(shapes)} params x {n} clients",
            ours=ours,
            unit="s",
            baseline=floor,
            baseline_name="read the same blob files + numpy float32 add (floor)",
            target_on="absolute",
            target=1.0,
            direction="lower",
            notes="in the runner process (one core), SQLite + local blobs; excludes the "
            "worker's polling interval",
        )
    ]
