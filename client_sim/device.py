"""One simulated Android device running a federated compute session.

The session follows the ODP client (and Bonawitz et al. 2019, "Towards Federated Learning at
Scale", section 2): check in with its version code and token; on rejection wait a random
delay inside the server's RetryWindow; on an assignment download the plan and checkpoint,
evaluate the eligibility policies against its own contribution history (NOT_ELIGIBLE when
one fails), train or evaluate on its own examples, report the result, upload the update and
record the contribution. Failure behaviours (dropout before report, crash between report and
upload, duplicate uploads) are drawn per session from the fleet's knobs.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from client_sim import data_sources, eligibility
from client_sim.compute_pool import ComputeJob
from client_sim.history import ContributionHistory
from client_sim.knobs import DeviceKnobs
from client_sim.plan_runtime import ExampleError, PlanError, PlanOutcome
from client_sim.protocol import DeviceApiClient, PermanentError, ProtocolError
from client_sim.stats import FleetStats
from fcp_server.protos import common_pb2, plan_pb2, task_assignments_pb2

_LOG = logging.getLogger(__name__)
Result = task_assignments_pb2.ReportResultRequest
# When the server sends no RetryWindow (or an error happened), retry after this many
# simulated seconds (FCP client's transient-error retry: 15 min, jitter 0.2).
TRANSIENT_RETRY = (12 * 60.0, 18 * 60.0)


# Runs a ComputeJob (in a worker process or inline) and returns the outcome.
Compute = Callable[[ComputeJob], PlanOutcome]


def retry_delay(window: common_pb2.RetryWindow, rng: np.random.Generator) -> float:
    """A delay drawn uniformly in [delay_min, delay_max] (FCP PickRetryTimeFromRange)."""
    lo = window.delay_min.seconds + window.delay_min.nanos / 1e9
    hi = window.delay_max.seconds + window.delay_max.nanos / 1e9
    if hi < lo:
        lo, hi = hi, lo
    if hi <= 0:
        return float(rng.uniform(*TRANSIENT_RETRY))
    return float(rng.uniform(lo, hi))


def rejection_delay(info: common_pb2.RejectionInfo, rng: np.random.Generator) -> float:
    """How long a rejected device waits (simulated seconds) before checking in again."""
    if info.WhichOneof("metadata") == "retry_window":
        return retry_delay(info.retry_window, rng)
    return float(rng.uniform(*TRANSIENT_RETRY))


def collection_for(plan: plan_pb2.ClientOnlyPlan) -> str:
    """The example collection a plan reads: training data for training, held-out for eval."""
    return data_sources.EVAL if plan.kind == plan_pb2.PlanKind.EVALUATION else data_sources.TRAIN


def round_index(a: task_assignments_pb2.TaskAssignment) -> int:
    """The round a contribution counts for: the server's min-sep current_index, else the id."""
    for spec in a.eligibility_task_info.eligibility_policies:
        if spec.WhichOneof("policy_type") == "min_sep_policy":
            return int(spec.min_sep_policy.current_index)
    return int(a.aggregation_id) if a.aggregation_id.isdigit() else 0


@dataclass
class SimulatedDevice:
    """A device: its identity, its own data and history, and its session logic."""

    data: data_sources.DeviceData
    population: str
    version_code: str
    knobs: DeviceKnobs
    api: DeviceApiClient
    compute: Compute
    stats: FleetStats
    rng: np.random.Generator
    sleep: Callable[[float], None]
    history: ContributionHistory = field(default_factory=ContributionHistory)

    @property
    def device_id(self) -> str:
        """The device's id (also used in logs)."""
        return self.data.device_id

    def run_session(self) -> float:
        """Runs one check-in session; returns the simulated seconds until the next one."""
        try:
            return self._session()
        except ProtocolError as e:
            self.stats.add("protocol_errors")
            _LOG.info("%s: session failed: %s", self.device_id, e)
            return float(self.rng.uniform(*TRANSIENT_RETRY))

    def _session(self) -> float:
        self.stats.add("check_ins")
        with self.stats.timed("check_in"):
            answer = self.api.check_in(self.population, self.version_code)
        if answer.rejection is not None:
            reason = common_pb2.RejectionReason.Enum.Name(answer.rejection.reason)
            self.stats.add(f"rejections.{reason}")
            return rejection_delay(answer.rejection, self.rng)
        assert answer.assignment is not None
        self.stats.add("assignments")
        return self._assigned(answer.assignment)

    def _assigned(self, a: task_assignments_pb2.TaskAssignment) -> float:
        with self.stats.timed("download"):
            plan_bytes = self.api.download(a.plan)
            checkpoint = self.api.download(a.init_checkpoint)
        plan = plan_pb2.ClientOnlyPlan()
        try:
            plan.ParseFromString(plan_bytes)
        except DecodeError:
            self.stats.add("reports.FAILED_MODEL_COMPUTATION")
            self.api.report_result(a, Result.FAILED_MODEL_COMPUTATION)
            return self.knobs.checkin_interval
        records = self.data.records(collection_for(plan))
        decision = eligibility.evaluate(
            a.eligibility_task_info,
            population=a.population_name,
            task_id=a.task_id,
            history=self.history,
            example_count=len(records),
        )
        if not decision.eligible or not records:
            self.stats.add("reports.NOT_ELIGIBLE")
            self.api.report_result(a, Result.NOT_ELIGIBLE)
            return self.knobs.checkin_interval
        if self.rng.random() < self.knobs.dropout_rate:
            # Interrupted mid-training (charger unplugged, app killed): never reports.
            self.stats.add("dropouts")
            self.sleep(self.knobs.compute_seconds(self.rng) * self.rng.random())
            return self.knobs.checkin_interval
        return self._train_and_report(a, plan, plan_bytes, checkpoint, records)

    def _train_and_report(
        self,
        a: task_assignments_pb2.TaskAssignment,
        plan: plan_pb2.ClientOnlyPlan,
        plan_bytes: bytes,
        checkpoint: bytes,
        records: tuple[bytes, ...],
    ) -> float:
        try:
            with self.stats.timed("train"):
                job = ComputeJob(self.device_id, plan_bytes, checkpoint, records)
                outcome = self.compute(job)
        except ExampleError as e:
            return self._failed(a, Result.FAILED_EXAMPLE_GENERATION, e)
        except PlanError as e:
            return self._failed(a, Result.FAILED_MODEL_COMPUTATION, e)
        self.sleep(self.knobs.compute_seconds(self.rng))
        self.stats.observe_loss(plan.kind, outcome.mean_loss)
        with self.stats.timed("report"):
            response = self.api.report_result(a, Result.COMPLETED)
        self.stats.add("reports.COMPLETED")
        if response.HasField("rejection_info") or not response.upload_instruction.upload_location:
            self.stats.add("reports_refused")
            if response.HasField("rejection_info"):
                return rejection_delay(response.rejection_info, self.rng)
            return self.knobs.checkin_interval
        if self.rng.random() < self.knobs.crash_after_report_rate:
            self.stats.add("crashes_after_report")
            return self.knobs.checkin_interval
        try:
            with self.stats.timed("upload"):
                self.api.upload(response.upload_instruction, outcome.update)
        except PermanentError as e:
            # 409: the round reached its goal or closed while this device trained (late).
            self.stats.add(f"uploads_refused.{e.status}")
            return self.knobs.checkin_interval
        self.stats.add("uploads")
        if self.rng.random() < self.knobs.duplicate_upload_rate:
            self._duplicate_upload(response.upload_instruction, outcome.update)
        self.history.record(a.population_name, a.task_id, round_index(a))
        return self.knobs.checkin_interval

    def _duplicate_upload(
        self, instruction: task_assignments_pb2.UploadInstruction, update: bytes
    ) -> None:
        # A retried upload whose first response was lost: the server must not count it twice.
        try:
            self.api.upload(instruction, update)
            self.stats.add("duplicate_uploads.accepted")
        except ProtocolError:
            self.stats.add("duplicate_uploads.refused")

    def _failed(
        self, a: task_assignments_pb2.TaskAssignment, result: "Result.Result", e: Exception
    ) -> float:
        name = Result.Result.Name(result)
        _LOG.warning("%s: %s: %s", self.device_id, name, e)
        self.stats.add(f"reports.{name}")
        self.api.report_result(a, result)
        return self.knobs.checkin_interval
