"""Load generators: spawned processes of client threads, each on a keep-alive connection.

They run outside the server's processes (issue #8). Every process builds its request bodies
before a shared barrier, so only the requests themselves are timed; a job's rate is the
number of successful answers over the span from the barrier to its last answer. The client
is `http.client` (lighter per request than httpx), so the generator costs as little of the
shared cores as possible.
"""

import dataclasses
import gzip
import http.client
import multiprocessing
import threading
import time
import urllib.parse
from multiprocessing.synchronize import Barrier
from typing import Any

import numpy as np

from tools.benchmarks import workload


@dataclasses.dataclass(frozen=True)
class Job:
    """What one load process does."""

    base_url: str
    method: str
    # Paths, dealt round-robin to the process's threads (each path once); with `duration`
    # every thread repeats all of them, each starting at another path.
    paths: tuple[str, ...]
    threads: int
    # "checkin" (a CreateTaskAssignmentRequest) or "update" (a device update).
    body: str
    # Expected status (e.g. 201 for check-ins, 204 for uploads).
    ok_status: int
    # Repeat the paths for this many seconds (check-ins); 0 = each path once (uploads).
    duration: float = 0.0
    gzip: bool = False
    shapes: workload.Shapes = workload.TINY
    distinct_bodies: int = 2
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One process's counts and its time span (monotonic clock, shared by processes)."""

    ok: int
    failed: int
    started: float
    finished: float
    # Uncompressed payload bytes of the successful requests.
    payload_bytes: int


def _bodies(job: Job) -> list[tuple[bytes, int]]:
    """(wire body, payload size) pairs built before timing starts."""
    if job.body == "checkin":
        from fcp_server.protos import task_assignments_pb2

        req = task_assignments_pb2.CreateTaskAssignmentRequest()
        req.client_version.version_code = "100"
        data = req.SerializeToString()
        return [(data, len(data))]
    rng = np.random.default_rng(job.seed)
    out = []
    for _ in range(job.distinct_bodies):
        raw = workload.update_bytes(workload.update_arrays(job.shapes, rng))
        out.append((gzip.compress(raw, compresslevel=6) if job.gzip else raw, len(raw)))
    return out


def _headers(job: Job) -> dict[str, str]:
    if job.body == "checkin":
        return {"Content-Type": "application/x-protobuf", "Accept": "application/x-protobuf"}
    headers = {"Content-Type": "application/octet-stream"}
    if job.gzip:
        headers["Content-Encoding"] = "gzip"
    return headers


def _thread(
    job: Job, paths: list[str], bodies: list[tuple[bytes, int]], results: list[list[int]]
) -> None:
    host = urllib.parse.urlsplit(job.base_url)
    conn = http.client.HTTPConnection(host.hostname or "127.0.0.1", host.port, timeout=120)
    headers = _headers(job)
    ok = failed = payload = 0
    deadline = time.monotonic() + job.duration
    i = 0
    while paths and (i < len(paths) if job.duration == 0 else time.monotonic() < deadline):
        wire, size = bodies[i % len(bodies)]
        try:
            conn.request(job.method, paths[i % len(paths)], body=wire, headers=headers)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException):
            conn.close()
            status = -1
        if status == job.ok_status:
            ok, payload = ok + 1, payload + size
        else:
            failed += 1
        i += 1
    conn.close()
    results.append([ok, failed, payload])


def _lanes(job: Job) -> list[list[str]]:
    """Each thread's paths: a share of them once, or all of them for a timed job.

    A timed job repeats its paths, so every thread gets the whole list (rotated, to spread
    the threads over them): dealt out instead, a job with fewer paths than threads would
    leave threads idle (B4's single check-in path ran one client per process that way).
    """
    paths = list(job.paths)
    if job.duration == 0 or not paths:
        return [paths[k :: job.threads] for k in range(job.threads)]
    return [paths[k % len(paths) :] + paths[: k % len(paths)] for k in range(job.threads)]


def _process(job: Job, barrier: Barrier, queue: "multiprocessing.Queue[Any]") -> None:
    bodies = _bodies(job)
    lanes = _lanes(job)
    results: list[list[int]] = []
    threads = [
        threading.Thread(target=_thread, args=(job, lane, bodies, results)) for lane in lanes
    ]
    barrier.wait()
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    finished = time.monotonic()
    ok, failed, payload = (sum(r[k] for r in results) for k in range(3))
    queue.put(Outcome(ok, failed, started, finished, payload))


def run(jobs: list[Job]) -> list[Outcome]:
    """Runs each job in its own spawned process, all released together; returns outcomes."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(jobs))
    queue: multiprocessing.Queue[Any] = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(job, barrier, queue)) for job in jobs]
    for p in procs:
        p.start()
    try:
        outcomes = [queue.get(timeout=3600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return outcomes


def rate(outcomes: list[Outcome], what: str = "ok") -> float:
    """Successful requests (what="ok") or payload bytes ("bytes") per second, all processes."""
    span = max(o.finished for o in outcomes) - min(o.started for o in outcomes)
    total = sum(o.ok if what == "ok" else o.payload_bytes for o in outcomes)
    return total / span if span > 0 else 0.0
