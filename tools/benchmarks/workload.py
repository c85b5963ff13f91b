"""The benchmark workload: model shapes, server/client plans, tasks and device updates.

The default model is the EMNIST-style CNN of the ODP guide (McMahan et al. 2017, arXiv
1602.05629; `task_builder.examples.models.emnist_cnn`): 1,663,370 float32 parameters, 6.6 MB
per update. The server never runs the model, so the pure server benchmarks use random arrays
of its exact Keras shapes (kernels HWIO / [in, out]). `WIDE_10M` widens the hidden dense layer
to about 10M parameters. Plans are real `fcp.ServerPlan` protos with FIXED_GAUSSIAN DP
(`DifferentiallyPrivateFactory.gaussian_fixed`) and SGD on the server.
"""

import dataclasses
import math

import numpy as np

from fcp_server import checkpoints
from fcp_server.aggregation import ClientUpdate
from fcp_server.aggregation.state import Tensor
from fcp_server.protos import plan_pb2, task_builder_pb2, task_pb2

Shapes = tuple[tuple[int, ...], ...]
Array = Tensor


def cnn_shapes(hidden: int) -> Shapes:
    """Trainable shapes of the EMNIST CNN with a `hidden`-unit dense layer (28x28x1 -> 10)."""
    return (
        (5, 5, 1, 32),
        (32,),
        (5, 5, 32, 64),
        (64,),
        (7 * 7 * 64, hidden),
        (hidden,),
        (hidden, 10),
        (10,),
    )


EMNIST_CNN = cnn_shapes(512)  # 1,663,370 parameters
WIDE_10M = cnn_shapes(3161)  # 9,999,773 parameters
TINY = cnn_shapes(8)  # 77,324 parameters (for --quick)


def num_params(shapes: Shapes) -> int:
    """Total number of elements."""
    return sum(math.prod(s) for s in shapes)


def size_label(shapes: Shapes) -> str:
    """'1.66M', '10M', ... for table rows."""
    n = num_params(shapes)
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


@dataclasses.dataclass(frozen=True)
class DpConfig:
    """The DP parameters of the benchmark plans."""

    noise_multiplier: float = 1.0
    # Small enough that every random update is clipped: the slower, realistic path.
    clip_norm: float = 0.5


def _tensor_specs(shapes: Shapes) -> list[plan_pb2.TensorSpec]:
    return [
        plan_pb2.TensorSpec(name=f"trainable/{i}", shape=list(s), dtype="float32")
        for i, s in enumerate(shapes)
    ]


def _loss_metric() -> plan_pb2.MetricSpec:
    return plan_pb2.MetricSpec(
        name="loss",
        finalizer=plan_pb2.MetricSpec.RATIO,
        state=[
            plan_pb2.TensorSpec(name="total", shape=[], dtype="float32"),
            plan_pb2.TensorSpec(name="count", shape=[], dtype="float32"),
        ],
    )


def server_plan(
    shapes: Shapes, report_goal: int, rounds: int = 1, dp: DpConfig | None = None
) -> plan_pb2.ServerPlan:
    """A training plan: FIXED_GAUSSIAN with clients_per_round = report_goal, server SGD."""
    dp = dp or DpConfig()
    return plan_pb2.ServerPlan(
        kind=plan_pb2.PlanKind.TRAINING,
        model=plan_pb2.ModelSpec(trainable=_tensor_specs(shapes)),
        algorithm=task_builder_pb2.LearningAlgo.FED_AVG,
        server_optimizer=plan_pb2.OptimizerSpec(
            type=task_builder_pb2.Optimizer.SGD, learning_rate=1.0
        ),
        aggregation=plan_pb2.AggregationSpec(
            dp_type=task_builder_pb2.DpAggregator.FIXED_GAUSSIAN,
            noise_multiplier=dp.noise_multiplier,
            clip_norm=dp.clip_norm,
            dp_delta=1e-6,
            clients_per_round=report_goal,
        ),
        metrics=[_loss_metric()],
        num_rounds=rounds,
        report_goal=report_goal,
    )


def client_plan(shapes: Shapes) -> plan_pb2.ClientOnlyPlan:
    """A device plan; the server stores it but never runs it, so the program is a stub."""
    return plan_pb2.ClientOnlyPlan(
        kind=plan_pb2.PlanKind.TRAINING,
        tflite_model=b"benchmark: the server never runs the device program",
        model=plan_pb2.ModelSpec(trainable=_tensor_specs(shapes)),
        metrics=[_loss_metric()],
        algorithm=task_builder_pb2.LearningAlgo.FED_AVG,
    )


def training_task(report_goal: int, capacity: int, rounds: int = 1) -> task_pb2.Task:
    """A training task proto; `capacity` is the round's max_aggregation_size."""
    task = task_pb2.Task(
        total_iteration=rounds,
        min_aggregation_size=report_goal,
        max_aggregation_size=capacity,
    )
    task.info.traffic_weight = 100
    policy = task.info.training_info.eligibility_task_info.eligibility_policies.add()
    policy.min_sep_policy.minimum_separation = 0
    return task


def random_weights(shapes: Shapes, rng: np.random.Generator, scale: float) -> list[Array]:
    """float32 arrays of the given shapes, N(0, scale^2)."""
    return [rng.normal(0.0, scale, size=s).astype(np.float32) for s in shapes]


def initial_checkpoint(shapes: Shapes, rng: np.random.Generator) -> bytes:
    """An initial checkpoint (weights only, as the task builder writes it)."""
    weights = random_weights(shapes, rng, 0.05)
    return checkpoints.encode_tensors({f"trainable/{i}": w for i, w in enumerate(weights)})


def update_arrays(shapes: Shapes, rng: np.random.Generator) -> list[Array]:
    """One device delta; its global L2 norm is about 1, above the plans' clip of 0.5."""
    return random_weights(shapes, rng, 1.0 / math.sqrt(num_params(shapes)))


def update_bytes(arrays: list[Array], num_examples: int = 20) -> bytes:
    """A device update in the server's safetensors layout, with a loss metric state."""
    loss = (np.float32(1.5 * num_examples).reshape(()), np.float32(num_examples).reshape(()))
    return checkpoints.encode_update(
        ClientUpdate(trainable=tuple(arrays), num_examples=num_examples, metrics={"loss": loss})
    )
