"""The fleet's compute processes load TensorFlow before the first device wakes up."""

import time

import httpx
import psutil
import pytest

from client_sim import data_sources
from client_sim.fleet import Fleet, FleetConfig
from client_sim.knobs import DeviceKnobs

pytestmark = [pytest.mark.tf, pytest.mark.slow]
WORKERS = 2


def _fleet() -> Fleet:
    devices = [data_sources.DeviceData("device-0", {data_sources.TRAIN: ()})]
    config = FleetConfig(
        population="pop", compute_workers=WORKERS, knobs=DeviceKnobs.ideal(), time_scale=0.01
    )
    transport = httpx.MockTransport(lambda request: httpx.Response(503))
    return Fleet(devices, config, transport=transport, base_url="http://fcp.test")


def _has_tensorflow(pid: int) -> bool:
    return any("tensorflow" in m.path for m in psutil.Process(pid).memory_maps())


def test_every_compute_process_has_loaded_tensorflow_when_the_warm_up_returns():
    # Arrange
    fleet = _fleet()
    # Act
    seconds = fleet._start_compute()
    executor = fleet._executor
    try:
        assert executor is not None
        pids = list(executor._processes)  # type: ignore[attr-defined]
        # Assert
        assert seconds > 0
        assert len(pids) == WORKERS
        assert all(_has_tensorflow(pid) for pid in pids)
    finally:
        if executor is not None:
            executor.shutdown(wait=True)


def test_the_warm_up_is_reported_apart_from_the_fleet_time():
    # Arrange
    fleet = _fleet()
    # Act
    before = time.time()
    summary = fleet.run(until=lambda: True, poll_interval=0.01)
    after = time.time()
    # Assert
    assert summary["stop_reason"] == "goal reached"
    # The devices' start on the wall clock: after the warm-up, before the run returned.
    started = summary["started_unix_seconds"]
    assert isinstance(started, float)
    assert before + summary["compute_warmup_seconds"] - 1e-3 <= started <= after
    warmup, elapsed = summary["compute_warmup_seconds"], summary["elapsed_seconds"]
    assert isinstance(warmup, float) and isinstance(elapsed, float)
    assert warmup > 0
    assert fleet._executor is None
