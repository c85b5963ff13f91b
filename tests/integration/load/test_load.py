"""Load: 1000 devices against 4 gunicorn workers + 2 worker processes + PostgreSQL, 20 rounds.

Issue 9 item 2. The server runs as deployed (gunicorn gthread workers, separate `fcp-server
worker` processes, PostgreSQL, a local blob directory, the demo environment, which sets no
request limits); the devices run in separate processes (asyncio + httpx) and speak the real
protocol, with 10% dropouts and stragglers (see `devices`). Everything asserted is read from
the server's side: its access log (zero 5xx), its database (all rounds completed, slot holders
never above capacity, exactly report_goal uploads per round) and its blobs (one gradient per
accepted upload, checkpoints = previous weights minus the mean of exactly those updates).

Sizes can be raised for a soak run through FCP_LOAD_* variables (tools/load_soak.sh).
Run with `-s` to see the figures.
"""

import collections
import dataclasses
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable

import httpx
import pytest

from fcp_server.protos import task_pb2
from fcp_server.storage.blobs import make_blob_store
from fcp_server.storage.models import AssignmentStatus, RoundStatus, TaskStatus
from tests.fixtures.db import _truncate_all
from tests.integration.load import devices, invariants, stack
from tests.integration.server import testkit

POP = "load"
PROTO = {"Content-Type": "application/x-protobuf", "Accept": "application/x-protobuf"}
OCTETS = {"Content-Type": "application/octet-stream"}


@dataclasses.dataclass(frozen=True)
class LoadParams:
    """The run's size; defaults are issue 9's, FCP_LOAD_* variables raise them for a soak."""

    devices: int = 1000
    rounds: int = 20
    report_goal: int = 40
    # ODP's default over-selection rate.
    over_selection: float = 0.3
    processes: int = 2
    # Real seconds per second of the server's retry windows (see `devices`).
    time_scale: float = 0.5
    # Short server timeouts so dropouts free their slots within a round.
    local_timeout: int = 15
    upload_timeout: int = 15
    round_deadline: int = 300
    time_limit: float = 600.0
    stall_seconds: float = 120.0

    @property
    def capacity(self) -> int:
        # ODP task builder: max_aggregation_size = int(report_goal * (1 + over_selection_rate)).
        return int(self.report_goal * (1 + self.over_selection))

    @classmethod
    def from_env(cls) -> "LoadParams":
        defaults = cls()
        values: dict[str, float] = {}
        for field in dataclasses.fields(cls):
            default = getattr(defaults, field.name)
            raw = os.environ.get(f"FCP_LOAD_{field.name.upper()}")
            values[field.name] = default if raw is None else type(default)(float(raw))
        return cls(**values)  # type: ignore[arg-type]


def open_task(url: str, p: LoadParams) -> int:
    """Creates, uploads and opens the training task over HTTP (as the task builder does)."""
    with httpx.Client(base_url=url, timeout=30.0) as http:
        task = testkit.training_task(
            report_goal=p.report_goal, rounds=p.rounds, max_size=p.capacity
        )
        resp = http.post(
            f"/taskmanagement/v1/population/{POP}:create-task",
            content=task_pb2.CreateTaskRequest(task=task).SerializeToString(),
            headers=PROTO,
        )
        assert resp.status_code == 201, resp.text
        created = task_pb2.CreateTaskResponse.FromString(resp.content).task
        plan = testkit.server_plan(
            report_goal=p.report_goal, num_rounds=p.rounds, deadline_seconds=p.round_deadline
        )
        for location, data in (
            (created.init_checkpoint_url[0], testkit.initial_checkpoint()),
            (created.server_phase_url[0], plan.SerializeToString()),
            (created.client_only_plan_url[0], testkit.client_plan().SerializeToString()),
        ):
            assert http.put(location, content=data, headers=OCTETS).status_code == 204
        opened = http.post(
            f"/taskmanagement/v1/population/{POP}/tasks/{created.task_id}:open", headers=PROTO
        )
        assert opened.status_code == 200, opened.text
        return created.task_id


def run_fleet(
    url: str, p: LoadParams, progress: Callable[[], int | None], alive: Callable[[], bool]
) -> devices.FleetStats:
    """Runs the devices in `p.processes` processes; returns their stats.

    `progress()` is the number of completed rounds, None once the task has ended. The run
    stops when it is None, when it has not moved for `p.stall_seconds`, after
    `p.time_limit` or when a server process died.
    """
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    results = spawn.Queue()
    share = -(-p.devices // p.processes)
    configs = [
        devices.FleetConfig(
            base_url=url,
            population=POP,
            first_device=i * share,
            devices=min(share, p.devices - i * share),
            seed=20240609,
            local_timeout=p.local_timeout,
            upload_timeout=p.upload_timeout,
            time_scale=p.time_scale,
        )
        for i in range(p.processes)
    ]
    procs = [
        spawn.Process(target=devices.fleet_process, args=(c, stop, results), name=f"fleet-{i}")
        for i, c in enumerate(configs)
    ]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + p.time_limit
        last, moved = progress(), time.monotonic()
        while last is not None and alive() and time.monotonic() < deadline:
            time.sleep(0.5)
            now, current = time.monotonic(), progress()
            if current != last:
                last, moved = current, now
            elif now - moved > p.stall_seconds:
                break
        stop.set()
        parts = [results.get(timeout=120) for _ in procs]
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return devices.merge(parts)


def _percentiles(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    q = statistics.quantiles(values, n=100)
    return f"p50 {q[49]:.0f} ms, p95 {q[94]:.0f} ms, max {max(values):.0f} ms"


def _print_figures(
    p: LoadParams,
    seconds: float,
    access: stack.AccessSummary,
    fleet: devices.FleetStats,
    facts: list[invariants.RoundFacts],
    sampler: invariants.CapacitySampler,
) -> None:
    checkins, total = access.total("checkin"), access.total()
    print(f"\n== load: {p.devices} devices, {p.processes} load processes, {p.rounds} rounds")
    print(
        f"wall time {seconds:.1f} s; check-ins {checkins} ({checkins / seconds:.1f}/s); "
        f"requests {total} ({total / seconds:.1f}/s); server 5xx {access.server_errors()}"
    )
    print("answers by endpoint (from the server's access log) and latencies:")
    for endpoint in sorted({e for e, _ in access.counts}):
        statuses = {s: n for (e, s), n in sorted(access.counts.items()) if e == endpoint}
        print(f"  {endpoint:<10} {statuses}")
        print(f"  {'':<10} server {_percentiles(access.times_ms[endpoint])}")
        if endpoint in fleet.latencies_ms:
            print(f"  {'':<10} client {_percentiles(fleet.latencies_ms[endpoint])}")
    print(
        f"fates {dict(fleet.fates)}; reports rejected {fleet.reports_rejected}; "
        f"uploads refused (409) {fleet.uploads_refused}; "
        f"transport errors {dict(fleet.transport_errors)}; capacity samples {sampler.samples}"
    )
    for line in fleet.unexpected:
        print(f"unexpected answer: {line}")
    print("round att  status     assigned peak/cap timeouts canceled reported aggregated  secs")
    for f in facts:
        secs = (f.completed_at - f.created_at).total_seconds() if f.completed_at else 0.0
        timeouts = f.count(AssignmentStatus.LOCAL_TIMEOUT, AssignmentStatus.UPLOAD_TIMEOUT)
        print(
            f"{f.iteration:>5} {f.attempt:>3}  {f.status.value:<10} {f.assigned:>8} "
            f"{sampler.peak_held.get(f.pk, 0):>4}/{f.capacity:<3} {timeouts:>8} "
            f"{f.count(AssignmentStatus.CANCELED):>8} {f.reported:>8} {f.aggregated:>10} "
            f"{secs:>5.1f}"
        )


@pytest.mark.postgres
@pytest.mark.slow
def test_thousand_devices_complete_every_round_with_exactly_the_goal(
    postgres_database_url, tmp_path
):
    p = LoadParams.from_env()
    _truncate_all(postgres_database_url)
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    cfg = stack.StackConfig(
        database_url=postgres_database_url,
        blob_dir=blob_dir,
        log_dir=tmp_path / "logs",
        settings=(
            ("FCP_LOCAL_COMPUTE_TIMEOUT_SECONDS", str(p.local_timeout)),
            ("FCP_UPLOAD_TIMEOUT_SECONDS", str(p.upload_timeout)),
            ("FCP_WORKER_INTERVAL_SECONDS", "0.25"),
            # Every device calls from 127.0.0.1: a per-address limit would throttle the fleet.
            ("FCP_RATE_LIMIT_REQUESTS", "0"),
        ),
    )

    def progress() -> int | None:
        (task,) = invariants.task_rows(postgres_database_url)
        return task.completed_iterations if task.status == TaskStatus.OPEN else None

    with stack.running(cfg) as server:
        task_id = open_task(server.url, p)
        started = time.monotonic()
        with invariants.CapacitySampler(postgres_database_url) as sampler:
            fleet = run_fleet(server.url, p, progress, server.alive)
        seconds = time.monotonic() - started
        survived = server.alive()

    access = stack.read_access_log(cfg.log_dir / "access.log")
    (task,) = invariants.task_rows(postgres_database_url)
    facts = invariants.round_facts(postgres_database_url, task.id)
    _print_figures(p, seconds, access, fleet, facts, sampler)

    # The stack stayed up and answered every request without a server error.
    assert survived, "a server process died during the run"
    assert sampler.error is None, sampler.error
    assert access.server_errors() == 0
    assert stack.logged_errors(cfg.log_dir) == []
    assert all(s < 500 and s != 429 for c in fleet.statuses.values() for s in c), fleet.statuses
    assert fleet.unexpected == []
    assert fleet.transport_errors == {}
    assert fleet.checksum_mismatches == 0

    # Never more slot holders than capacity = report_goal x (1 + over-selection).
    assert sampler.samples > 0
    assert sampler.violations == []
    assert all(f.capacity == p.capacity for f in facts)
    assert all(sampler.peak_held.get(f.pk, 0) <= f.capacity for f in facts)

    # Every round completed, in order, and the task with them.
    assert task.status == TaskStatus.COMPLETED, task.status_reason
    assert task.completed_iterations == p.rounds
    completed = [f for f in facts if f.status == RoundStatus.COMPLETED]
    assert [f.iteration for f in completed] == list(range(1, p.rounds + 1))
    assert all(f.status in (RoundStatus.COMPLETED, RoundStatus.CANCELED) for f in facts)

    # Exactly report_goal updates reported and aggregated in each round.
    for f in completed:
        uploaded = f.count(AssignmentStatus.UPLOAD_COMPLETED)
        assert (f.reported, f.aggregated, uploaded) == (p.report_goal,) * 3, f
    # The devices agree with the database on what they were given and what was accepted
    # (summed over a round's attempts: a retried round keeps its iteration id).
    assigned, accepted = collections.Counter[str](), collections.Counter[str]()
    for f in facts:
        assigned[f"{task_id}/{f.iteration}"] += f.assigned
        accepted[f"{task_id}/{f.iteration}"] += f.count(AssignmentStatus.UPLOAD_COMPLETED)
    assert fleet.assigned == dict(assigned)
    assert fleet.accepted == dict(accepted)

    # Blobs: one gradient per accepted upload, none left by refused ones, exact FedAvg outputs.
    blobs = make_blob_store(blob_dir.as_uri())
    uploaded_ids = invariants.uploaded_ids(postgres_database_url, [f.pk for f in facts])
    plan = testkit.server_plan(report_goal=p.report_goal, num_rounds=p.rounds)
    problems = []
    for f in completed:
        on_disk = invariants.gradient_blob_ids(blobs, POP, task_id, f.iteration)
        expected = set().union(*(uploaded_ids[g.pk] for g in facts if g.iteration == f.iteration))
        if on_disk != expected:
            problems.append(f"round {f.iteration}: gradient blobs differ from accepted uploads")
        problems += invariants.check_aggregation(
            blobs, plan, POP, task_id, f.iteration, uploaded_ids[f.pk]
        )
    assert problems == []

    # The run exercised what it claims to: dropouts, and stragglers too late for their round
    # (dropouts time out only in rounds that outlast the local timeout: see the table).
    assert fleet.fates.get("dropout", 0) > 0
    assert fleet.reports_rejected > 0 and fleet.uploads_refused > 0
