"""Load-generating devices: many lightweight clients speaking the real device HTTP protocol.

Each device loops check-in -> download plan and checkpoint (ETag-revalidated, gzip) ->
report-result -> gzip'd upload, exactly as `client_sim.protocol` does, but instead of running
the TFLite plan it uploads a valid synthetic update for the test model of
`tests.integration.server.testkit`. The server is what is under test. Per assignment a device
draws a fate: prompt, dropout (takes the assignment and never reports), late report (a
straggler past its compute time, often past the local timeout or the round's close) or late
upload (reports in time, uploads late). Rejected check-ins wait the server's retry window
scaled by `time_scale`: at 0.5 a 60-300 s window becomes 30-150 s, so 1000 devices check in
as often as 2000 would in real time (two shared cores must also serve the rounds' traffic).

One process runs `FleetConfig.devices` devices as asyncio tasks over one pooled httpx client
and sends its `FleetStats` back through a queue; the test runs several such processes so that
the load generator shares the machine's cores with the server honestly.
"""

import asyncio
import collections
import contextlib
import dataclasses
import enum
import gzip
import hashlib
import multiprocessing.queues
import multiprocessing.synchronize
import time
from typing import Any

import httpx
import numpy as np

from fcp_server.protos import common_pb2, task_assignments_pb2
from tests.integration.server import testkit

PROTO = "application/x-protobuf"
_GZIP = common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP
_Result = task_assignments_pb2.ReportResultRequest


class Fate(enum.Enum):
    """What a device does with one assignment."""

    PROMPT = "prompt"
    DROPOUT = "dropout"
    LATE_REPORT = "late_report"
    LATE_UPLOAD = "late_upload"


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """One load process: which devices, how they behave, where the server is."""

    base_url: str
    population: str
    first_device: int
    devices: int
    seed: int
    # Shares of assignments per fate (the rest are prompt).
    dropout_rate: float = 0.10
    late_report_rate: float = 0.08
    late_upload_rate: float = 0.04
    # Server timeouts the stragglers are drawn around (seconds).
    local_timeout: float = 15.0
    upload_timeout: float = 15.0
    # Real seconds per second of the server's retry windows.
    time_scale: float = 0.5
    # Connections of this process's pool (devices share them as a gateway would).
    connections: int = 32
    # Devices start over this many seconds, not all in the same instant.
    ramp_seconds: float = 30.0


@dataclasses.dataclass
class FleetStats:
    """What one process's devices saw, merged over processes by the test."""

    # endpoint -> HTTP status -> count
    statuses: dict[str, dict[int, int]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    # endpoint -> latencies in milliseconds
    latencies_ms: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )
    transport_errors: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    # "task/round" -> assignments received / uploads accepted (204)
    assigned: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    accepted: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    fates: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    # Report-result answered with a rejection (straggler after close or timeout).
    reports_rejected: int = 0
    # Uploads refused with 409 (round closed or full, assignment timed out).
    uploads_refused: int = 0
    checksum_mismatches: int = 0
    # The first few answers no device should ever get.
    unexpected: list[str] = dataclasses.field(default_factory=list)

    def note_unexpected(self, what: str) -> None:
        if len(self.unexpected) < 20:
            self.unexpected.append(what)

    def plain(self) -> "FleetStats":
        """A copy made of plain dicts and lists (picklable across processes)."""
        return FleetStats(
            statuses={k: dict(v) for k, v in self.statuses.items()},
            latencies_ms=dict(self.latencies_ms),
            transport_errors=dict(self.transport_errors),
            assigned=dict(self.assigned),
            accepted=dict(self.accepted),
            fates=dict(self.fates),
            reports_rejected=self.reports_rejected,
            uploads_refused=self.uploads_refused,
            checksum_mismatches=self.checksum_mismatches,
            unexpected=list(self.unexpected),
        )


def _add(into: dict[Any, int], more: dict[Any, int]) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


def merge(parts: list[FleetStats]) -> FleetStats:
    """Sums the stats of several processes."""
    total = FleetStats()
    for part in parts:
        for endpoint, counts in part.statuses.items():
            _add(total.statuses[endpoint], counts)
        for endpoint, values in part.latencies_ms.items():
            total.latencies_ms[endpoint].extend(values)
        _add(total.transport_errors, part.transport_errors)
        _add(total.assigned, part.assigned)
        _add(total.accepted, part.accepted)
        _add(total.fates, part.fates)
        total.reports_rejected += part.reports_rejected
        total.uploads_refused += part.uploads_refused
        total.checksum_mismatches += part.checksum_mismatches
        total.unexpected.extend(part.unexpected)
    return total.plain()


def draw_fate(cfg: FleetConfig, rng: np.random.Generator) -> Fate:
    """The fate of one assignment, drawn with the configured shares."""
    point = rng.random()
    for fate, share in (
        (Fate.DROPOUT, cfg.dropout_rate),
        (Fate.LATE_REPORT, cfg.late_report_rate),
        (Fate.LATE_UPLOAD, cfg.late_upload_rate),
    ):
        if point < share:
            return fate
        point -= share
    return Fate.PROMPT


def retry_delay(
    rejection: common_pb2.RejectionInfo, time_scale: float, rng: np.random.Generator
) -> float:
    """A time-scaled draw from the server's retry window (ODP clients wait in the window)."""
    low = rejection.retry_window.delay_min.seconds
    high = max(rejection.retry_window.delay_max.seconds, low)
    return float(rng.uniform(low, high)) * time_scale


def synthetic_update(rng: np.random.Generator) -> bytes:
    """A valid update for the test model: random deltas, examples and loss."""
    examples = int(rng.integers(1, 50))
    return testkit.update_bytes(
        rng.uniform(-1.0, 1.0, size=testkit.W_SHAPE),
        rng.uniform(-1.0, 1.0, size=testkit.B_SHAPE),
        num_examples=examples,
        loss=(float(rng.uniform(0.0, 2.0)) * examples, float(examples)),
    )


class Device:
    """One simulated device: its own ETag cache and random stream, a shared connection pool."""

    def __init__(
        self,
        index: int,
        cfg: FleetConfig,
        http: httpx.AsyncClient,
        stats: FleetStats,
        stop: asyncio.Event,
    ) -> None:
        self.cfg = cfg
        self.http = http
        self.stats = stats
        self.stop = stop
        self.rng = np.random.default_rng([cfg.seed, index])
        self.cache: dict[str, tuple[str, bytes]] = {}

    async def sleep(self, seconds: float) -> None:
        """Sleeps, waking early when the fleet stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=max(seconds, 0.0))

    async def call(
        self, endpoint: str, method: str, url: str, **kwargs: object
    ) -> httpx.Response | None:
        """One request, counted by endpoint and status; None after a transport error."""
        started = time.perf_counter()
        try:
            resp = await self.http.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as e:
            self.stats.transport_errors[f"{endpoint}: {type(e).__name__}"] += 1
            return None
        self.stats.latencies_ms[endpoint].append((time.perf_counter() - started) * 1000)
        self.stats.statuses[endpoint][resp.status_code] += 1
        return resp

    async def check_in(self) -> task_assignments_pb2.CreateTaskAssignmentResponse | None:
        req = task_assignments_pb2.CreateTaskAssignmentRequest(
            client_version=common_pb2.ClientVersion(version_code="100"),
            resource_capabilities=common_pb2.ResourceCapabilities(
                supported_compression_formats=[_GZIP]
            ),
        )
        resp = await self.call(
            "checkin",
            "POST",
            f"/taskassignment/v1/population/{self.cfg.population}:create-task-assignment",
            content=req.SerializeToString(),
            headers={"Content-Type": PROTO, "Accept": PROTO},
        )
        if resp is None or resp.status_code not in (200, 201):
            if resp is not None:
                self.stats.note_unexpected(f"check-in {resp.status_code}: {resp.text[:200]}")
            return None
        return task_assignments_pb2.CreateTaskAssignmentResponse.FromString(resp.content)

    async def download(self, endpoint: str, resource: common_pb2.Resource) -> bool:
        """GETs a plan or checkpoint with ETag revalidation and checks its SHA-256."""
        cached = self.cache.get(resource.uri)
        headers = {"Accept-Encoding": "gzip"}
        if cached is not None:
            headers["If-None-Match"] = cached[0]
        resp = await self.call(endpoint, "GET", resource.uri, headers=headers)
        if resp is None:
            return False
        if resp.status_code == 304 and cached is not None:
            body = cached[1]
        elif resp.status_code == 200:
            body = resp.content  # httpx undoes Content-Encoding: gzip
            self.cache[resource.uri] = (resp.headers.get("ETag", ""), body)
        else:
            self.stats.note_unexpected(f"{endpoint} {resp.status_code}: {resp.text[:200]}")
            return False
        expected = resource.sha256_checksum
        if expected and hashlib.sha256(body).hexdigest() != expected:
            self.stats.checksum_mismatches += 1
            return False
        return True

    async def report(
        self, a: task_assignments_pb2.TaskAssignment
    ) -> task_assignments_pb2.ReportResultResponse | None:
        req = _Result(
            result=_Result.COMPLETED,
            resource_capabilities=common_pb2.ResourceCapabilities(
                supported_compression_formats=[_GZIP]
            ),
        )
        path = (
            f"/taskassignment/v1/population/{a.population_name}/task/{a.task_id}"
            f"/aggregation/{a.aggregation_id}/task-assignment/{a.assignment_id}:report-result"
        )
        resp = await self.call(
            "report",
            "PUT",
            path,
            content=req.SerializeToString(),
            headers={"Content-Type": PROTO, "Accept": PROTO},
        )
        if resp is None or resp.status_code != 200:
            if resp is not None:
                self.stats.note_unexpected(f"report {resp.status_code}: {resp.text[:200]}")
            return None
        return task_assignments_pb2.ReportResultResponse.FromString(resp.content)

    async def upload(self, key: str, instruction: task_assignments_pb2.UploadInstruction) -> None:
        body = synthetic_update(self.rng)
        headers = dict(instruction.extra_request_headers)
        if instruction.compression_format == _GZIP:
            body = gzip.compress(body, mtime=0)
        resp = await self.call(
            "upload", "PUT", instruction.upload_location, content=body, headers=headers
        )
        if resp is None:
            return
        if resp.status_code == 204:
            self.stats.accepted[key] += 1
        elif resp.status_code == 409:
            self.stats.uploads_refused += 1
        else:
            self.stats.note_unexpected(f"upload {resp.status_code}: {resp.text[:200]}")

    async def work(self, a: task_assignments_pb2.TaskAssignment) -> None:
        """Everything after a successful check-in, following the drawn fate."""
        key = f"{a.task_id}/{a.aggregation_id}"
        self.stats.assigned[key] += 1
        if not await self.download("plan", a.plan):
            return
        if not await self.download("checkpoint", a.init_checkpoint):
            return
        fate = draw_fate(self.cfg, self.rng)
        self.stats.fates[fate.value] += 1
        if fate == Fate.DROPOUT:
            return  # the assignment is never reported; the server must time it out
        compute = self.rng.uniform(0.2, 1.0)
        if fate == Fate.LATE_REPORT:
            compute = self.rng.uniform(0.3, 1.5) * self.cfg.local_timeout
        await self.sleep(compute)
        if self.stop.is_set():
            return
        answer = await self.report(a)
        if answer is None:
            return
        if not answer.HasField("upload_instruction"):
            self.stats.reports_rejected += 1
            return
        if fate == Fate.LATE_UPLOAD:
            await self.sleep(self.rng.uniform(0.3, 1.5) * self.cfg.upload_timeout)
            if self.stop.is_set():
                return
        await self.upload(key, answer.upload_instruction)

    async def run(self) -> None:
        try:
            await self.loop()
        except Exception as e:  # a device must not die silently: the test reports it
            self.stats.note_unexpected(f"device stopped: {type(e).__name__}: {e}")

    async def loop(self) -> None:
        await self.sleep(self.rng.uniform(0.0, self.cfg.ramp_seconds))
        while not self.stop.is_set():
            answer = await self.check_in()
            if answer is None:
                await self.sleep(self.rng.uniform(0.5, 1.5))
            elif answer.HasField("rejection_info"):
                await self.sleep(retry_delay(answer.rejection_info, self.cfg.time_scale, self.rng))
            else:
                await self.work(answer.task_assignment)
                # A device that took part comes back later, as a phone would.
                await self.sleep(self.rng.uniform(1.0, 5.0))


async def _watch(stop: multiprocessing.synchronize.Event, flag: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(0.1)
    flag.set()


async def run_fleet(cfg: FleetConfig, stop: multiprocessing.synchronize.Event) -> FleetStats:
    """Runs this process's devices until `stop` is set; returns what they saw."""
    stats = FleetStats()
    flag = asyncio.Event()
    # Idle connections are dropped before gunicorn's 5 s keep-alive closes them, so a request
    # never races the server's close on a reused connection.
    limits = httpx.Limits(
        max_connections=cfg.connections,
        max_keepalive_connections=cfg.connections,
        keepalive_expiry=2.0,
    )
    timeout = httpx.Timeout(60.0, pool=None)
    async with httpx.AsyncClient(base_url=cfg.base_url, limits=limits, timeout=timeout) as http:
        devices = [Device(cfg.first_device + i, cfg, http, stats, flag) for i in range(cfg.devices)]
        tasks = [asyncio.create_task(d.run()) for d in devices]
        await _watch(stop, flag)
        # Devices mid-request finish that request; give them a moment, then cancel the rest.
        _, pending = await asyncio.wait(tasks, timeout=10.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return stats.plain()


def fleet_process(
    cfg: FleetConfig,
    stop: multiprocessing.synchronize.Event,
    results: "multiprocessing.queues.Queue[FleetStats]",
) -> None:
    """Entry point of one load process (importable for the `spawn` start method)."""
    results.put(asyncio.run(run_fleet(cfg, stop)))
