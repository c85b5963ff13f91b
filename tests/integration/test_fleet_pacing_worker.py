"""The worker's close poll: rounds waiting to close are picked up between two full ticks."""

import threading
import time
from types import SimpleNamespace

import pytest

from fcp_server import worker
from fcp_server.settings import ServerSettings, SettingsError


class _CountingWorker(worker.Worker):
    """A worker whose steps only count their calls (the loop's schedule is under test)."""

    def __init__(self, settings: ServerSettings) -> None:
        super().__init__(SimpleNamespace(settings=settings))  # type: ignore[arg-type]
        self.ticks = 0
        self.close_checks = 0

    def tick(self) -> worker.TickReport:
        self.ticks += 1
        return worker.TickReport()

    def _close_rounds(self) -> int:
        self.close_checks += 1
        return 0


def _run_until(loop: _CountingWorker, done, timeout: float = 10.0) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_close_poll_checks_for_rounds_to_close_between_ticks():
    # Arrange
    settings = ServerSettings(worker_interval_seconds=60.0, worker_close_poll_seconds=0.01)
    loop = _CountingWorker(settings)
    # Act
    _run_until(loop, lambda: loop.close_checks >= 3)
    # Assert
    assert loop.ticks == 1 and loop.close_checks >= 3


def test_without_close_poll_only_ticks_close_rounds():
    # Arrange
    loop = _CountingWorker(ServerSettings(worker_interval_seconds=0.02))
    # Act
    _run_until(loop, lambda: loop.ticks >= 3)
    # Assert
    assert loop.ticks >= 3 and loop.close_checks == 0


def test_a_failing_close_check_keeps_the_loop_alive():
    # Arrange
    settings = ServerSettings(worker_interval_seconds=60.0, worker_close_poll_seconds=0.01)
    loop = _CountingWorker(settings)
    calls = []

    def failing() -> int:
        calls.append(1)
        raise RuntimeError("boom")

    loop._close_rounds = failing  # type: ignore[method-assign]
    # Act
    _run_until(loop, lambda: len(calls) >= 2)
    # Assert
    assert len(calls) >= 2


@pytest.mark.parametrize("poll", ["-0.1", "1.0", "5", "nan"])
def test_close_poll_must_be_below_the_tick_interval(poll):
    # Arrange
    env = {"FCP_WORKER_INTERVAL_SECONDS": "1.0", "FCP_WORKER_CLOSE_POLL_SECONDS": poll}
    # Act / Assert
    with pytest.raises(SettingsError, match="FCP_WORKER_CLOSE_POLL_SECONDS"):
        ServerSettings.from_env(env)


def test_close_poll_is_read_from_the_environment_and_off_by_default():
    # Act
    default = ServerSettings.from_env({})
    set_ = ServerSettings.from_env({"FCP_WORKER_CLOSE_POLL_SECONDS": "0.02"})
    # Assert
    assert default.worker_close_poll_seconds == 0.0
    assert set_.worker_close_poll_seconds == 0.02
