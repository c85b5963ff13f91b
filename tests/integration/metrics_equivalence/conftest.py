"""Builds each model case once per session and runs its devices through the real pipeline."""

import dataclasses
import pathlib

import pytest

pytest.importorskip("tensorflow_federated")

from fcp_server.aggregation.state import ClientUpdate
from tests.integration.metrics_equivalence import cases, pipeline


@dataclasses.dataclass(frozen=True)
class CaseRun:
    """One case after its devices reported and the server finalized the round."""

    built: pipeline.Built
    data: pipeline.ClientData
    updates: list[ClientUpdate]
    server: dict[str, float]  # finalized by the server, by metric name
    keras: dict[str, float]  # Keras on the union, by metric name


class CaseRuns:
    """Lazily builds and runs the cases a test asks for (each at most once)."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self._workdir = workdir
        self._runs: dict[str, CaseRun] = {}

    def get(self, case: cases.ModelCase) -> CaseRun:
        if case.name not in self._runs:
            # Different seeds per case, so that cases sharing a model do not share values.
            index = cases.CASES.index(case)
            built = pipeline.build(case, self._workdir, seed=10 * index + 1)
            data = pipeline.make_data(case, seed=index)
            updates = pipeline.run_devices(built, data)
            self._runs[case.name] = CaseRun(
                built=built,
                data=data,
                updates=updates,
                server=pipeline.server_metrics(built, updates),
                keras=pipeline.union_reference(built, data, case.metrics),
            )
        return self._runs[case.name]


@pytest.fixture(scope="session")
def case_runs(tmp_path_factory: pytest.TempPathFactory) -> CaseRuns:
    return CaseRuns(tmp_path_factory.mktemp("metric_models"))
