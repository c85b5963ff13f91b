"""Builders of small, real ServerPlans and updates for the aggregation and codec tests."""

from collections.abc import Sequence

import numpy as np

from fcp_server.aggregation.state import ClientUpdate, ModelWeights, Tensors
from fcp_server.protos import plan_pb2, task_builder_pb2

TRAINABLE_SHAPES: list[tuple[int, ...]] = [(3, 2), (2,)]
NUM_THRESHOLDS = 5
DpType = task_builder_pb2.DpAggregator.Enum
OptimizerType = task_builder_pb2.Optimizer.Enum
# [tp, fp, tn, fn] per threshold of one device: 4 positives, 4 negatives.
AUC_STATE = ([4, 3, 2, 1, 0], [4, 2, 1, 0, 0], [0, 2, 3, 4, 4], [0, 1, 2, 3, 4])


def make_plan(
    *,
    dp_type: DpType = task_builder_pb2.DpAggregator.FIXED_GAUSSIAN,
    noise_multiplier: float = 1.0,
    clip_norm: float = 1.0,
    clients_per_round: int = 4,
    zeroing_norm: float = 0.0,
    optimizer: OptimizerType = task_builder_pb2.Optimizer.SGD,
    learning_rate: float = 1.0,
    momentum: float = 0.0,
    trainable_shapes: Sequence[tuple[int, ...]] = tuple(TRAINABLE_SHAPES),
    with_metrics: bool = True,
) -> plan_pb2.ServerPlan:
    """A linear-model plan: weight (3, 2), bias (2,), one non-trainable (2,)."""
    plan = plan_pb2.ServerPlan(kind=plan_pb2.PlanKind.TRAINING, num_rounds=3)
    for i, shape in enumerate(trainable_shapes):
        plan.model.trainable.add(name=f"trainable/{i}", shape=list(shape), dtype="float32")
    plan.model.non_trainable.add(name="non_trainable/0", shape=[2], dtype="float32")
    plan.server_optimizer.type = optimizer
    plan.server_optimizer.learning_rate = learning_rate
    plan.server_optimizer.momentum = momentum
    plan.server_optimizer.beta_1 = 0.9
    plan.server_optimizer.beta_2 = 0.999
    plan.server_optimizer.epsilon = 1e-7
    agg = plan.aggregation
    agg.dp_type = dp_type
    agg.noise_multiplier = noise_multiplier
    agg.clip_norm = clip_norm
    agg.clients_per_round = clients_per_round
    agg.zeroing_norm = zeroing_norm
    plan.report_goal = clients_per_round
    if with_metrics:
        finalizer = plan_pb2.MetricSpec.Finalizer
        loss = plan.metrics.add(name="loss", finalizer=finalizer.RATIO, max_state_per_example=100)
        loss.state.add(name="total", shape=[], dtype="float32")
        loss.state.add(name="count", shape=[], dtype="float32")
        auc = plan.metrics.add(name="auc", finalizer=finalizer.AUC_ROC, max_state_per_example=1)
        auc.thresholds.extend(np.linspace(0.0, 1.0, NUM_THRESHOLDS).tolist())
        for k in ("tp", "fp", "tn", "fn"):
            auc.state.add(name=k, shape=[NUM_THRESHOLDS], dtype="float32")
    return plan


def make_update(
    trainable: Tensors,
    *,
    num_examples: int = 10,
    loss: tuple[float, float] = (5.0, 10.0),
    with_metrics: bool = True,
) -> ClientUpdate:
    """An update with the given deltas and plausible metric state."""
    metrics: dict[str, Tensors] = {}
    if with_metrics:
        metrics["loss"] = (np.array(loss[0], np.float32), np.array(loss[1], np.float32))
        # 4 positives and 4 negatives; counts at ascending thresholds.
        metrics["auc"] = tuple(np.array(c, np.float32) for c in AUC_STATE)
    return ClientUpdate(trainable=trainable, num_examples=num_examples, metrics=metrics)


def constant_update(value: float, *, num_examples: int = 10) -> ClientUpdate:
    """An update whose every element equals `value`."""
    trainable = tuple(np.full(s, value, np.float32) for s in TRAINABLE_SHAPES)
    return make_update(trainable, num_examples=num_examples)


def random_weights(rng: np.random.Generator) -> ModelWeights:
    """Random float32 weights for the plan's model."""
    trainable = tuple(rng.normal(size=s).astype(np.float32) for s in TRAINABLE_SHAPES)
    return ModelWeights(trainable, (rng.normal(size=2).astype(np.float32),))
