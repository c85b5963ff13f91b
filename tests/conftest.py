"""Root test configuration: shared fixtures and the end-of-run process cleanup."""

from collections.abc import Iterator

import pytest

from task_builder import tff_runtime

pytest_plugins: list[str] = ["tests.fixtures.db", "tests.fixtures.blobs"]


@pytest.fixture(scope="session", autouse=True)
def _end_tff_workers() -> Iterator[None]:
    """TFF leaves a worker_binary child behind; end it when this test process is done."""
    yield
    tff_runtime.reap_tff_workers()
