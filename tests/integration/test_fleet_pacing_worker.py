"""The worker's close poll: rounds waiting to close are picked up between two full ticks."""

import threading
import time
from types import SimpleNamespace

import pytest

from fcp_server import worker
from fcp_server.settings import ServerSettings, SettingsError


class _CountingWorker(worker.Worker):
    """A worker whose steps only count their calls (the loop's schedule is under test)."""

    def __init__(self, settings: ServerSettings, doorbell=None) -> None:
        super().__init__(SimpleNamespace(settings=settings))  # type: ignore[arg-type]
        self.ticks = 0
        self.close_checks = 0
        self.doorbell = doorbell

    def _listen(self):
        return self.doorbell

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


class _Doorbell:
    """A doorbell rung by the test; counts the waits and whether it was closed."""

    def __init__(self) -> None:
        self.rings = threading.Semaphore(0)
        self.waits = 0
        self.closed = False

    def wait(self, timeout: float) -> bool:
        self.waits += 1
        return self.rings.acquire(timeout=timeout)

    def close(self) -> None:
        self.closed = True


def test_a_ring_makes_the_worker_look_for_rounds_to_close_between_ticks():
    # Arrange: no close poll, and a tick only every minute
    doorbell = _Doorbell()
    loop = _CountingWorker(ServerSettings(worker_interval_seconds=60.0), doorbell)
    doorbell.rings.release(2)
    # Act
    _run_until(loop, lambda: loop.close_checks >= 2)
    # Assert: one look per ring, the listener closed when the loop stopped
    assert loop.ticks == 1 and loop.close_checks == 2
    assert doorbell.closed


def test_without_a_ring_the_doorbell_wait_lasts_until_the_tick():
    # Arrange
    doorbell = _Doorbell()
    loop = _CountingWorker(ServerSettings(worker_interval_seconds=0.05), doorbell)
    # Act
    _run_until(loop, lambda: loop.ticks >= 3)
    # Assert: the waits were the doorbell's, and none of them led to a close check
    assert doorbell.waits >= 2 and loop.close_checks == 0


def test_a_broken_doorbell_leaves_ticks_and_polls():
    # Arrange
    class Broken(_Doorbell):
        def wait(self, timeout: float) -> bool:
            self.waits += 1
            raise OSError("gone")

    doorbell = Broken()
    settings = ServerSettings(worker_interval_seconds=60.0, worker_close_poll_seconds=0.01)
    loop = _CountingWorker(settings, doorbell)
    # Act
    _run_until(loop, lambda: loop.close_checks >= 3)
    # Assert: dropped after its first failure, closed, and the poll went on
    assert doorbell.waits == 1 and doorbell.closed


def test_stop_ends_a_doorbell_wait():
    # Arrange
    loop = _CountingWorker(ServerSettings(worker_interval_seconds=60.0), _Doorbell())
    # Act / Assert (`_run_until` asserts the thread ended after stop)
    _run_until(loop, lambda: loop.ticks >= 1)


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
