"""Builders and an HTTP driver for server tests: a tiny numpy linear model, plans, updates.

The plans are real fcp.ServerPlan / fcp.ClientOnlyPlan protos and the checkpoints and updates
real safetensors files (encoded with the server's own codec), for a 2-tensor linear model
y = x @ w + b with w: [3, 1] and b: [1].
"""

import gzip
from dataclasses import dataclass

import numpy as np

from fcp_server import checkpoints
from fcp_server.aggregation import ClientUpdate
from fcp_server.protos import (
    common_pb2,
    plan_pb2,
    task_assignments_pb2,
    task_builder_pb2,
    task_pb2,
)

PROTO = "application/x-protobuf"
POP = "digits"
W_SHAPE = (3, 1)
B_SHAPE = (1,)
GZIP = common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP


def model_spec() -> plan_pb2.ModelSpec:
    return plan_pb2.ModelSpec(
        trainable=[
            plan_pb2.TensorSpec(name="trainable/0", shape=list(W_SHAPE), dtype="float32"),
            plan_pb2.TensorSpec(name="trainable/1", shape=list(B_SHAPE), dtype="float32"),
        ]
    )


def loss_metric() -> plan_pb2.MetricSpec:
    return plan_pb2.MetricSpec(
        name="loss",
        finalizer=plan_pb2.MetricSpec.RATIO,
        state=[
            plan_pb2.TensorSpec(name="total", shape=[], dtype="float32"),
            plan_pb2.TensorSpec(name="count", shape=[], dtype="float32"),
        ],
    )


def server_plan(
    *,
    report_goal: int = 3,
    kind: int = plan_pb2.PlanKind.TRAINING,
    dp_type: int = task_builder_pb2.DpAggregator.UNKNOWN,
    noise_multiplier: float = 0.0,
    clip_norm: float = 0.0,
    target_epsilon: float = 0.0,
    population_size: int = 0,
    deadline_seconds: int = 0,
    learning_rate: float = 1.0,
    algorithm: int = task_builder_pb2.LearningAlgo.FED_AVG,
    num_rounds: int = 2,
    **aggregation,
) -> plan_pb2.ServerPlan:
    """A server plan; `aggregation` sets further AggregationSpec fields (adaptive, tree)."""
    return plan_pb2.ServerPlan(
        kind=kind,
        model=model_spec(),
        algorithm=algorithm,
        server_optimizer=plan_pb2.OptimizerSpec(
            type=task_builder_pb2.Optimizer.SGD, learning_rate=learning_rate
        ),
        aggregation=plan_pb2.AggregationSpec(
            dp_type=dp_type,
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            dp_delta=1e-5 if dp_type else 0.0,
            dp_target_epsilon=target_epsilon,
            population_size=population_size,
            clients_per_round=report_goal,
            **aggregation,
        ),
        metrics=[loss_metric()],
        num_rounds=num_rounds,
        report_goal=report_goal,
        round_deadline_seconds=deadline_seconds,
    )


def eval_plan(report_goal: int = 1) -> plan_pb2.ServerPlan:
    return server_plan(report_goal=report_goal, kind=plan_pb2.PlanKind.EVALUATION)


def client_plan(
    kind: int = plan_pb2.PlanKind.TRAINING,
    algorithm: int = task_builder_pb2.LearningAlgo.FED_AVG,
) -> plan_pb2.ClientOnlyPlan:
    plan = plan_pb2.ClientOnlyPlan(
        kind=kind,
        tflite_model=b"not-a-real-tflite",
        model=model_spec(),
        metrics=[loss_metric()],
        algorithm=algorithm,
    )
    if algorithm == task_builder_pb2.LearningAlgo.FED_SGD:
        plan.gradient_signature = "gradient"
    return plan


def initial_weights() -> tuple[np.ndarray, np.ndarray]:
    return (
        np.arange(3, dtype=np.float32).reshape(W_SHAPE),
        np.array([0.5], dtype=np.float32),
    )


def initial_checkpoint() -> bytes:
    w, b = initial_weights()
    return checkpoints.encode_tensors({"trainable/0": w, "trainable/1": b})


def update_bytes(
    delta_w: np.ndarray | float = 0.1,
    delta_b: np.ndarray | float = 0.2,
    *,
    num_examples: int = 10,
    loss: tuple[float, float] = (5.0, 10.0),
    trainable: bool = True,
) -> bytes:
    tensors: tuple[np.ndarray, ...] = ()
    if trainable:
        tensors = (
            np.broadcast_to(np.asarray(delta_w, dtype=np.float32), W_SHAPE).copy(),
            np.broadcast_to(np.asarray(delta_b, dtype=np.float32), B_SHAPE).copy(),
        )
    metrics = {"loss": (np.float32(loss[0]).reshape(()), np.float32(loss[1]).reshape(()))}
    return checkpoints.encode_update(
        ClientUpdate(trainable=tensors, num_examples=num_examples, metrics=metrics)
    )


def training_task(
    *,
    report_goal: int = 3,
    rounds: int = 2,
    max_size: int | None = None,
    min_version: str = "",
    max_version: str = "",
    weight: int = 100,
    min_separation: int = 1,
) -> task_pb2.Task:
    task = task_pb2.Task(
        total_iteration=rounds,
        min_aggregation_size=report_goal,
        max_aggregation_size=max_size if max_size is not None else report_goal + 1,
        min_client_version=min_version,
        max_client_version=max_version,
    )
    task.info.traffic_weight = weight
    policy = task.info.training_info.eligibility_task_info.eligibility_policies.add()
    policy.min_sep_policy.minimum_separation = min_separation
    return task


def eval_task(
    *,
    report_goal: int = 2,
    rounds: int = 2,
    weight: int = 25,
    max_size: int | None = None,
    every_rounds: int = 1,
    every_hours: int = 0,
    training_task_id: int = 0,
) -> task_pb2.Task:
    task = task_pb2.Task(
        total_iteration=rounds,
        min_aggregation_size=report_goal,
        max_aggregation_size=max_size if max_size is not None else report_goal,
    )
    task.info.traffic_weight = weight
    info = task.info.evaluation_info
    info.training_task_id = training_task_id  # set by the server for a linked eval task
    if every_hours:
        info.check_point_selector.duration_selector.hours = every_hours
    else:
        info.check_point_selector.iteration_selector.size = every_rounds
    return task


def reference_eval_weight(evaluation_traffic: float) -> int:
    """The eval task's traffic weight next to training's 100 (ODP task builder, ref. 1.11)."""
    if evaluation_traffic == 1.0:
        return 10_000
    return int(evaluation_traffic * 100 / (1 - evaluation_traffic))


@dataclass
class Assignment:
    proto: task_assignments_pb2.TaskAssignment

    @property
    def base(self) -> str:
        a = self.proto
        return (
            f"/taskassignment/v1/population/{a.population_name}/task/{a.task_id}"
            f"/aggregation/{a.aggregation_id}/task-assignment/{a.assignment_id}"
        )


class Api:
    """Drives the server through its HTTP API with binary protobuf, like the builder and devices."""

    def __init__(self, client, headers: dict[str, str] | None = None) -> None:
        self.client = client
        self.headers = headers or {}

    def _h(self, **extra: str) -> dict[str, str]:
        return {"Content-Type": PROTO, "Accept": PROTO, **self.headers, **extra}

    # Task management.
    def create(self, task: task_pb2.Task, eval_task: task_pb2.Task | None = None, pop: str = POP):
        req = task_pb2.CreateTaskRequest(task=task)
        if eval_task is not None:
            req.eval_task.CopyFrom(eval_task)
        return self.client.post(
            f"/taskmanagement/v1/population/{pop}:create-task",
            data=req.SerializeToString(),
            headers=self._h(),
        )

    def created(
        self, task: task_pb2.Task, eval_task: task_pb2.Task | None = None, pop: str = POP
    ) -> task_pb2.CreateTaskResponse:
        resp = self.create(task, eval_task, pop)
        assert resp.status_code == 201, resp.get_data(as_text=True)
        return task_pb2.CreateTaskResponse.FromString(resp.data)

    def put(self, url: str, data: bytes):
        return self.client.put(
            url, data=data, headers={**self.headers, "Content-Type": "application/octet-stream"}
        )

    def upload_artifacts(
        self,
        task: task_pb2.Task,
        plan: plan_pb2.ServerPlan,
        cplan: plan_pb2.ClientOnlyPlan,
        checkpoint: bytes | None,
    ) -> None:
        if checkpoint is not None:
            assert self.put(task.init_checkpoint_url[0], checkpoint).status_code == 204
        assert self.put(task.server_phase_url[0], plan.SerializeToString()).status_code == 204
        assert self.put(task.client_only_plan_url[0], cplan.SerializeToString()).status_code == 204

    def task_call(self, pop: str, task_id: int, verb: str):
        url = f"/taskmanagement/v1/population/{pop}/tasks/{task_id}:{verb}"
        if verb == "get":
            return self.client.get(url, headers=self._h())
        return self.client.post(url, headers=self._h())

    def get_task(self, task_id: int, pop: str = POP) -> task_pb2.Task:
        resp = self.task_call(pop, task_id, "get")
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return task_pb2.GetTaskByIdResponse.FromString(resp.data).task

    def open_training(
        self,
        task: task_pb2.Task | None = None,
        plan=None,
        checkpoint: bytes | None = None,
        pop: str = POP,
    ) -> task_pb2.Task:
        created = self.created(task or training_task(), pop=pop).task
        self.upload_artifacts(
            created,
            plan or server_plan(report_goal=created.min_aggregation_size),
            client_plan(),
            checkpoint or initial_checkpoint(),
        )
        resp = self.task_call(pop, created.task_id, "open")
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return task_pb2.GetTaskByIdResponse.FromString(resp.data).task

    def open_training_and_eval(
        self,
        train: task_pb2.Task,
        evaluation: task_pb2.Task,
        plan: plan_pb2.ServerPlan | None = None,
        pop: str = POP,
    ) -> task_pb2.CreateTaskResponse:
        """TRAINING_AND_EVAL: creates the linked pair, uploads both builds, opens both."""
        created = self.created(train, evaluation, pop)
        self.upload_artifacts(
            created.task,
            plan or server_plan(report_goal=train.min_aggregation_size),
            client_plan(),
            initial_checkpoint(),
        )
        self.upload_eval_artifacts(created.eval_task)
        for task in (created.task, created.eval_task):
            resp = self.task_call(pop, task.task_id, "open")
            assert resp.status_code == 200, resp.get_data(as_text=True)
        return created

    def upload_eval_artifacts(self, task: task_pb2.Task) -> None:
        self.upload_artifacts(
            task,
            eval_plan(task.min_aggregation_size),
            client_plan(plan_pb2.PlanKind.EVALUATION),
            None,
        )

    # Devices.
    def checkin(self, pop: str = POP, version: str = "100", gzip_ok: bool = True):
        req = task_assignments_pb2.CreateTaskAssignmentRequest()
        req.client_version.version_code = version
        if gzip_ok:
            req.resource_capabilities.supported_compression_formats.append(GZIP)
        resp = self.client.post(
            f"/taskassignment/v1/population/{pop}:create-task-assignment",
            data=req.SerializeToString(),
            headers=self._h(),
        )
        answer = task_assignments_pb2.CreateTaskAssignmentResponse()
        if resp.status_code in (200, 201, 401):
            answer.ParseFromString(resp.data)
        return resp, answer

    def assign(self, pop: str = POP, version: str = "100") -> Assignment:
        resp, answer = self.checkin(pop, version)
        assert resp.status_code == 201, answer
        return Assignment(answer.task_assignment)

    def report(
        self,
        a: Assignment,
        result=task_assignments_pb2.ReportResultRequest.COMPLETED,
        gzip_ok: bool = True,
        base: str | None = None,
    ):
        req = task_assignments_pb2.ReportResultRequest(result=result)
        if gzip_ok:
            req.resource_capabilities.supported_compression_formats.append(GZIP)
        resp = self.client.put(
            f"{base or a.base}:report-result", data=req.SerializeToString(), headers=self._h()
        )
        answer = (
            task_assignments_pb2.ReportResultResponse.FromString(resp.data)
            if resp.status_code == 200
            else None
        )
        return resp, answer

    def upload(
        self,
        location: str,
        data: bytes,
        *,
        compress: bool = True,
        content_type: str = "application/octet-stream",
        raw: bytes | None = None,
    ):
        body = raw if raw is not None else (gzip.compress(data) if compress else data)
        headers = {**self.headers, "Content-Type": content_type}
        if compress or raw is not None:
            headers["Content-Encoding"] = "gzip"
        return self.client.put(location, data=body, headers=headers)

    def contribute_to(self, task_id: int, data: bytes, pop: str = POP) -> Assignment:
        """Contributes to one task: devices assigned elsewhere report NOT_ELIGIBLE (slot freed)."""
        for _ in range(200):
            a = self.assign(pop)
            if a.proto.task_id == str(task_id):
                resp, answer = self.report(a)
                assert resp.status_code == 200 and answer.HasField("upload_instruction"), answer
                up = self.upload(answer.upload_instruction.upload_location, data)
                assert up.status_code == 204, up.get_data(as_text=True)
                return a
            self.report(a, task_assignments_pb2.ReportResultRequest.NOT_ELIGIBLE)
        raise AssertionError(f"no check-in was assigned to task {task_id}")

    def contribute(self, data: bytes | None = None, pop: str = POP) -> Assignment:
        """Check-in, report COMPLETED and upload; asserts each step succeeded."""
        a = self.assign(pop)
        resp, answer = self.report(a)
        assert resp.status_code == 200 and answer.HasField("upload_instruction"), answer
        up = self.upload(answer.upload_instruction.upload_location, data or update_bytes())
        assert up.status_code == 204, up.get_data(as_text=True)
        return a
