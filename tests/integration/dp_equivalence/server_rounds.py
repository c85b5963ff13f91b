"""Runs training rounds on a real in-process FCP server with devices running the TFLite plan.

The task is registered with the task builder's own registration client; each device checks
in, downloads the ClientOnlyPlan and the round's checkpoint, trains with
`client_sim.plan_runtime` and uploads over the device API (httpx over WSGI); the worker then
closes the round with the server's round-close code. Nothing is mocked: only the transport
is in-process and the clock is manual.
"""

import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import httpx
import numpy as np

from client_sim import plan_runtime
from client_sim.knobs import LATEST_VERSION_CODE
from client_sim.protocol import DeviceApiClient
from fcp_server import checkpoints
from fcp_server.aggregation import ServerState
from fcp_server.app import create_app, worker_deps
from fcp_server.clock import ManualClock
from fcp_server.protos import plan_pb2, task_assignments_pb2, task_pb2
from fcp_server.services import blob_paths
from fcp_server.settings import ServerSettings
from fcp_server.worker import Worker
from task_builder import artifacts, registration

BASE_URL = "http://fcp.test"
_COMPLETED = task_assignments_pb2.ReportResultRequest.COMPLETED


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """What the server published for one round."""

    state: ServerState
    metrics: dict[str, float]
    # Global L2 norm of each device's update before any clipping, in check-in order.
    update_norms: tuple[float, ...]


class ServerHarness:
    """One app + worker + device API client on a fresh database and blob directory."""

    def __init__(self, settings: ServerSettings) -> None:
        self.app = create_app(settings, clock=ManualClock(), checkin_rng=np.random.default_rng(0))
        self.ctx = self.app.extensions["fcp"]
        self.worker = Worker(worker_deps(self.ctx))
        transport = httpx.WSGITransport(app=self.app)
        self.http = httpx.Client(transport=transport, base_url=BASE_URL)
        self.devices = DeviceApiClient(
            self.http, rng=np.random.default_rng(0), sleep=lambda _seconds: None
        )
        self.management = registration.TaskManagementClient(BASE_URL, transport=transport)

    def close(self) -> None:
        """Closes the clients and the database engine."""
        self.management.close()
        self.http.close()
        self.ctx.database.dispose()

    def register(
        self, population: str, task: task_pb2.Task, plans: artifacts.PlanArtifacts
    ) -> task_pb2.Task:
        """Creates, uploads and opens the training task as the task builder does."""
        (opened,) = registration.register_tasks(self.management, population, (task, plans))
        return opened

    def contribute(self, population: str, records: Sequence[bytes]) -> float:
        """One device session: check in, train on `records`, report and upload.

        Returns:
            The global L2 norm of the device's update before any clipping.
        """
        answer = self.devices.check_in(population, LATEST_VERSION_CODE)
        assert answer.assignment is not None, answer.rejection
        assignment = answer.assignment
        plan = plan_pb2.ClientOnlyPlan.FromString(self.devices.download(assignment.plan))
        checkpoint = self.devices.download(assignment.init_checkpoint)
        outcome = plan_runtime.run_plan(plan, checkpoint, records)
        response = self.devices.report_result(assignment, _COMPLETED)
        assert response.upload_instruction.upload_location, response
        self.devices.upload(response.upload_instruction, outcome.update)
        return outcome.update_norm

    def run_round(
        self,
        task: task_pb2.Task,
        plan: plan_pb2.ServerPlan,
        clients: Sequence[Sequence[bytes]],
        round_number: int,
    ) -> RoundResult:
        """Every client contributes in order, then the worker closes the round."""
        population = task.population_name
        norms = tuple(self.contribute(population, records) for records in clients)
        assert self.worker.tick().rounds_closed == 1
        blobs = self.ctx.blobs
        data = blobs.get(blob_paths.server_checkpoint_blob(population, task.task_id, round_number))
        metrics = json.loads(
            blobs.get(blob_paths.metrics_blob(population, task.task_id, round_number))
        )
        state = checkpoints.decode_server_checkpoint(data, plan)
        return RoundResult(state=state, metrics=metrics, update_norms=norms)


@contextmanager
def running_server(settings: ServerSettings) -> Iterator[ServerHarness]:
    """A `ServerHarness` that is closed when the block ends."""
    harness = ServerHarness(settings)
    try:
        yield harness
    finally:
        harness.close()
