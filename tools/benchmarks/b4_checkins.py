"""B4: check-ins (create-task-assignment) under concurrent load, PostgreSQL and SQLite.

Ours is the real check-in: the request proto is parsed, the population's active rounds are
read and rated, and the slot is taken with the conditional UPDATE, which also writes the
assignment row and its status change (on PostgreSQL one statement, on SQLite one
transaction). One open round with room for every check-in keeps
each answer a 201. The baseline is a bare Flask endpoint on the same path and the same
gunicorn config that parses the request and answers a fixed assignment (no database).
Load: spawned processes of keep-alive client threads (2 x 8, each on its own connection) for a
fixed duration.
"""

import contextlib
import pathlib
import tempfile
from collections.abc import Iterator

import httpx
import numpy as np

from tools.benchmarks import loadgen, servers, workload
from tools.benchmarks.figures import Figure

POP = "bench_checkin"
LOAD_PROCESSES = 2
LOAD_THREADS = 8
PATH = f"/taskassignment/v1/population/{POP}:create-task-assignment"


def jobs(url: str, duration: float) -> list[loadgen.Job]:
    """The load: `LOAD_PROCESSES` x `LOAD_THREADS` keep-alive clients checking in for `duration`."""
    return [
        loadgen.Job(
            base_url=url,
            method="POST",
            paths=(PATH,),
            threads=LOAD_THREADS,
            body="checkin",
            ok_status=201,
            duration=duration,
        )
        for _ in range(LOAD_PROCESSES)
    ]


def _rate(url: str, duration: float) -> float:
    outcomes = loadgen.run(jobs(url, duration))
    if sum(o.ok for o in outcomes) == 0:
        raise RuntimeError(f"no check-in succeeded against {url}")
    return loadgen.rate(outcomes)


@contextlib.contextmanager
def _database(kind: str, root: pathlib.Path) -> Iterator[str]:
    if kind == "postgresql":
        with servers.postgres_database() as url:
            yield url
    else:
        yield servers.sqlite_database(root)


def _ours(kind: str, root: pathlib.Path, duration: float) -> float:
    root.mkdir(parents=True, exist_ok=True)
    with _database(kind, root) as db_url:
        env = servers.server_env(db_url, root / "blobs")
        with (
            servers.gunicorn("fcp_server.app:create_app()", env, root / "gunicorn.log") as (url, _),
            httpx.Client(base_url=url, timeout=60) as http,
        ):
            shapes = workload.TINY
            servers.register_task(
                http,
                POP,
                workload.training_task(report_goal=1_000_000, capacity=10_000_000),
                workload.server_plan(shapes, report_goal=1_000_000),
                workload.client_plan(shapes),
                workload.initial_checkpoint(shapes, np.random.default_rng(0)),
            )
            return _rate(url, duration)


def run(quick: bool) -> list[Figure]:
    """Check-ins/s on PostgreSQL and SQLite against the bare Flask endpoint."""
    duration = 2.0 if quick else 10.0
    with tempfile.TemporaryDirectory(prefix="fcp-b4-") as tmp:
        root = pathlib.Path(tmp)
        env = servers.server_env(f"sqlite:///{root / 'unused.sqlite'}", root / "blobs")
        app = "tools.benchmarks.bare_apps:flask_checkin_app()"
        with servers.gunicorn(app, env, root / "bare.log") as (url, _):
            bare = _rate(url, duration)
        ours = {kind: _ours(kind, root / kind, duration) for kind in ("postgresql", "sqlite")}
    where = (
        f"server: gunicorn 2 workers x 4 threads; load: {LOAD_PROCESSES} processes x "
        f"{LOAD_THREADS} threads for {duration:g} s; all on the same 2 cores"
    )
    figures = [
        Figure(
            benchmark="B4",
            name=f"check-ins, {kind}",
            ours=ours[kind],
            unit="assignments/s",
            baseline=bare,
            baseline_name="bare Flask endpoint, same gunicorn config",
            target_on="ratio",
            target=0.6,
            direction="higher",
            notes=where,
        )
        for kind in ("postgresql", "sqlite")
    ]
    figures.append(
        Figure(
            benchmark="B4",
            name="check-ins, postgresql (absolute)",
            ours=ours["postgresql"],
            unit="assignments/s",
            baseline=bare,
            baseline_name="bare Flask endpoint, same gunicorn config",
            target_on="absolute",
            target=1000.0,
            direction="higher",
            notes=where,
        )
    )
    return figures
