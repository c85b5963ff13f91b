"""Schedules a fleet of simulated devices against a federated compute server.

Devices are independent: each has its own data, history, version code, random stream and
HTTP client, and wakes on its own schedule. A heap of wake-up times is served by
`concurrency` threads (HTTP waits release the GIL), while the TFLite work runs in a pool of
`compute_workers` processes (spawned, so the GIL never serialises training). Simulated
seconds (retry windows, compute times, check-in intervals) are multiplied by `time_scale`,
the time-compression factor, before a thread sleeps. The fleet stops when the caller's stop
condition holds (e.g. the task's Nth round completed) or the duration has passed.
"""

import heapq
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import httpx
import numpy as np

from client_sim import compute_pool, plan_runtime
from client_sim.compute_pool import ComputeJob, run_compute_job
from client_sim.data_sources import DeviceData
from client_sim.device import Compute, SimulatedDevice
from client_sim.knobs import DeviceKnobs, VersionMix
from client_sim.network import FlakyTransport
from client_sim.protocol import DeviceApiClient, RetryPolicy
from client_sim.stats import FleetStats

_LOG = logging.getLogger(__name__)
MAX_CONCURRENCY = 1024


@dataclass(frozen=True)
class FleetConfig:
    """How the fleet runs (CLI flags end up here)."""

    population: str
    # Seeds every device's random stream (data split, versions, failures, delays).
    seed: int = 0
    # Devices in a session at the same time.
    concurrency: int = 8
    # TFLite worker processes; 0 runs training inline in the session thread.
    compute_workers: int = 2
    # Real seconds per simulated second.
    time_scale: float = 0.01
    knobs: DeviceKnobs = field(default_factory=DeviceKnobs)
    versions: VersionMix = field(default_factory=VersionMix)
    # Device token sent as odp-authorization-key (None: no header).
    auth_token: str | None = None
    # One token per device (device i uses auth_tokens[i % len]); overrides auth_token. A
    # server with device auth lets each token contribute once per round, so a fleet sharing
    # one token would get one assignment per round.
    auth_tokens: tuple[str, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if not self.population or "/" in self.population:
            raise ValueError(f"bad population name {self.population!r}")
        if not 0 < self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be in [1, {MAX_CONCURRENCY}]")
        if not 0 <= self.compute_workers <= 64:
            raise ValueError("compute_workers must be in [0, 64]")
        if not 0 < self.time_scale <= 10:
            raise ValueError(f"time_scale must be in (0, 10]: {self.time_scale}")


class Fleet:
    """A set of simulated devices sharing one server connection pool and compute pool."""

    def __init__(
        self,
        data: list[DeviceData],
        config: FleetConfig,
        *,
        transport: httpx.BaseTransport,
        base_url: str,
        compute: Compute | None = None,
    ) -> None:
        if not data:
            raise ValueError("a fleet needs at least one device")
        self.config = config
        self.stats = FleetStats()
        self._stop = threading.Event()
        self._transport = transport
        self._executor: Executor | None = None
        self._flaky: list[FlakyTransport] = []
        # Tests may wrap the real computation (e.g. to see which records a job carried).
        self._compute_override = compute
        seeds = np.random.SeedSequence(config.seed).spawn(len(data))
        self.devices = [
            self._make_device(d, s, base_url, self._token(i))
            for i, (d, s) in enumerate(zip(data, seeds, strict=True))
        ]

    def _sleep(self, simulated: float) -> None:
        if simulated > 0:
            with self.stats.timed("sleep"):
                self._stop.wait(simulated * self.config.time_scale)

    def _compute(self, job: ComputeJob) -> plan_runtime.PlanOutcome:
        if self._compute_override is not None:
            return self._compute_override(job)
        if self._executor is None:
            return run_compute_job(job)
        return self._executor.submit(run_compute_job, job).result()

    def _token(self, index: int) -> str | None:
        tokens = self.config.auth_tokens
        return tokens[index % len(tokens)] if tokens else self.config.auth_token

    def _make_device(
        self, data: DeviceData, seed: np.random.SeedSequence, base_url: str, token: str | None
    ) -> SimulatedDevice:
        rng = np.random.default_rng(seed)
        flaky = FlakyTransport(
            self._transport, error_rate=self.config.knobs.network_error_rate, rng=rng
        )
        self._flaky.append(flaky)
        http = httpx.Client(transport=flaky, base_url=base_url, timeout=60.0)
        api = DeviceApiClient(
            http,
            rng=rng,
            sleep=self._sleep,
            auth_token=token,
            retry=self.config.retry,
        )
        return SimulatedDevice(
            data=data,
            population=self.config.population,
            version_code=self.config.versions.draw(rng),
            knobs=self.config.knobs,
            api=api,
            compute=self._compute,
            stats=self.stats,
            rng=rng,
            sleep=self._sleep,
        )

    def _start_compute(self) -> float:
        """Starts the compute processes and waits until each one has loaded TFLite.

        A spawned process needs seconds to import TensorFlow; paying that before the first
        device wakes keeps it out of the sessions (the first round would otherwise wait for
        it). Returns the seconds the warm-up took.
        """
        started = time.monotonic()
        workers = self.config.compute_workers
        if self._compute_override is not None:
            return 0.0
        if not workers:
            plan_runtime.warm_up()
            return time.monotonic() - started
        self._executor = compute_pool.start(workers)
        return time.monotonic() - started

    def stop(self) -> None:
        """Asks every device to finish its current session and stop."""
        self._stop.set()

    def run(
        self,
        *,
        until: Callable[[], bool],
        duration: float | None = None,
        poll_interval: float = 0.5,
        on_progress: Callable[[dict[str, object]], None] | None = None,
    ) -> dict[str, object]:
        """Runs the devices until `until()` is true or `duration` real seconds passed.

        The compute processes are started and warmed up first; `duration` and the summary's
        `elapsed_seconds` count from the moment the first device may wake up (on the wall
        clock: `started_unix_seconds`) to the moment the stop condition held.

        Returns:
          The JSON-ready summary (counters, phase and elapsed seconds, stop reason).
        """
        threads: list[threading.Thread] = []
        reason = "stopped"
        try:
            warmup_seconds = self._start_compute()
            started = time.monotonic()
            # The same moment on the wall clock, which a server's timestamps can be set against.
            started_unix = time.time()
            schedule = _Schedule(self.devices, self.config, self._stop, self.stats)
            threads = [
                threading.Thread(target=schedule.serve, name=f"device-session-{i}", daemon=True)
                for i in range(self.config.concurrency)
            ]
            for t in threads:
                t.start()
            while not self._stop.is_set():
                if until():
                    reason = "goal reached"
                    break
                if duration is not None and time.monotonic() - started >= duration:
                    reason = "duration elapsed"
                    break
                if on_progress is not None:
                    on_progress(self.stats.snapshot())
                self._stop.wait(poll_interval)
            # The fleet's time ends here; the teardown below (sessions finishing, compute
            # processes unloading TensorFlow) is reported on its own.
            elapsed = time.monotonic() - started
        finally:
            stopping = time.monotonic()
            self._stop.set()
            for t in threads:
                t.join()
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
        summary = self.stats.snapshot()
        summary.update(
            elapsed_seconds=round(elapsed, 3),
            started_unix_seconds=started_unix,
            compute_warmup_seconds=round(warmup_seconds, 3),
            shutdown_seconds=round(time.monotonic() - stopping, 3),
            stop_reason=reason,
            devices=len(self.devices),
            session_errors=schedule.errors,
            network_errors_injected=sum(f.injected for f in self._flaky),
            http_retries=sum(d.api.retries for d in self.devices),
            download_cache_hits=sum(d.api.cache_hits for d in self.devices),
        )
        return summary


class _Schedule:
    """A heap of (wake time, device) served by the session threads."""

    def __init__(
        self,
        devices: list[SimulatedDevice],
        config: FleetConfig,
        stop: threading.Event,
        stats: FleetStats,
    ) -> None:
        self._stop = stop
        self._stats = stats
        self._scale = config.time_scale
        self._cond = threading.Condition()
        now = time.monotonic()
        rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(1)[0])
        # Devices first wake spread over one check-in interval, as a real fleet does.
        self._heap = [
            (now + float(rng.uniform(0, config.knobs.checkin_interval)) * self._scale, i, d)
            for i, d in enumerate(devices)
        ]
        heapq.heapify(self._heap)
        # Unexpected exceptions escaping a session (bugs); reported in the summary.
        self.errors = 0

    def _next(self) -> tuple[int, SimulatedDevice] | None:
        with self._stats.timed("idle"), self._cond:
            while not self._stop.is_set():
                if self._heap:
                    due, i, device = self._heap[0]
                    wait = due - time.monotonic()
                    if wait <= 0:
                        heapq.heappop(self._heap)
                        return i, device
                else:
                    wait = 0.5
                self._cond.wait(min(wait, 0.5))
            return None

    def serve(self) -> None:
        """Session-thread loop: take the next due device, run its session, reschedule it."""
        while (item := self._next()) is not None:
            i, device = item
            try:
                delay = device.run_session()
            except Exception:  # A bug must not silently kill the thread; count and go on.
                _LOG.exception("%s: unexpected session error", device.device_id)
                with self._cond:
                    self.errors += 1
                delay = device.knobs.checkin_interval
            with self._cond:
                heapq.heappush(self._heap, (time.monotonic() + delay * self._scale, i, device))
                self._cond.notify()
