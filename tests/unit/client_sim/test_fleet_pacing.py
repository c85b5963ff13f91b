"""Fleet pacing: rejected devices wait the server's retry window (scaled), phases are timed."""

import itertools
import threading
import time
from collections import defaultdict

import httpx
import pytest
from google.protobuf import duration_pb2

from client_sim import data_sources
from client_sim.fleet import Fleet, FleetConfig
from client_sim.knobs import DeviceKnobs
from client_sim.stats import FleetStats
from fcp_server.protos import common_pb2, task_assignments_pb2

DEVICES = 3
# The server's retry window in simulated seconds, and the fleet's real seconds per one.
WINDOW_S, TIME_SCALE = 5.0, 0.01


class _RejectingServer:
    """Rejects every check-in with a fixed retry window; records when each device came."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.check_ins: defaultdict[str, list[float]] = defaultdict(list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.check_ins[request.headers["odp-authorization-key"]].append(time.monotonic())
        body = task_assignments_pb2.CreateTaskAssignmentResponse()
        rejection = body.rejection_info
        rejection.reason = common_pb2.RejectionReason.NO_TASK_AVAILABLE
        window = rejection.retry_window
        window.delay_min.CopyFrom(duration_pb2.Duration(seconds=int(WINDOW_S)))
        window.delay_max.CopyFrom(duration_pb2.Duration(seconds=int(WINDOW_S)))
        return httpx.Response(200, content=body.SerializeToString())


def _fleet(server: _RejectingServer) -> Fleet:
    devices = [
        data_sources.DeviceData(f"device-{i}", {data_sources.TRAIN: ()}) for i in range(DEVICES)
    ]
    config = FleetConfig(
        population="pop",
        concurrency=DEVICES,
        compute_workers=0,
        time_scale=TIME_SCALE,
        knobs=DeviceKnobs.ideal(),
        auth_tokens=tuple(f"token-{i}" for i in range(DEVICES)),
    )

    def no_training(job: object) -> object:
        raise AssertionError("a rejected device must not train")

    return Fleet(
        devices,
        config,
        transport=httpx.MockTransport(server),
        base_url="http://fcp.test",
        compute=no_training,  # type: ignore[arg-type]
    )


def test_rejected_devices_wait_the_scaled_retry_window_before_checking_in_again():
    # Arrange
    server = _RejectingServer()
    fleet = _fleet(server)
    # Act
    summary = fleet.run(until=lambda: False, duration=0.6, poll_interval=0.05)
    # Assert
    assert set(server.check_ins) == {f"token-{i}" for i in range(DEVICES)}
    for times in server.check_ins.values():
        assert len(times) >= 2
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= WINDOW_S * TIME_SCALE * 0.99
    counts = summary["counts"]
    assert isinstance(counts, dict)
    assert counts["rejections.NO_TASK_AVAILABLE"] == sum(map(len, server.check_ins.values()))


def test_summary_reports_phase_warm_up_and_shutdown_seconds():
    # Arrange
    fleet = _fleet(_RejectingServer())
    # Act
    summary = fleet.run(until=lambda: False, duration=0.2, poll_interval=0.05)
    # Assert
    phases = summary["phase_seconds"]
    assert isinstance(phases, dict)
    assert phases["check_in"] > 0 and phases["idle"] > 0
    assert "train" not in phases and "upload" not in phases
    assert summary["compute_warmup_seconds"] == 0.0
    assert isinstance(summary["shutdown_seconds"], float)
    assert summary["stop_reason"] == "duration elapsed"


def test_timed_phase_counts_a_block_that_raises():
    # Arrange
    stats = FleetStats()
    # Act
    with pytest.raises(RuntimeError), stats.timed("upload"):
        time.sleep(0.01)
        raise RuntimeError("refused")
    with stats.timed("upload"):
        pass
    stats.add_seconds("download", 1.5)
    # Assert
    phases = stats.snapshot()["phase_seconds"]
    assert isinstance(phases, dict)
    assert phases["upload"] >= 0.01 and phases["download"] == 1.5
