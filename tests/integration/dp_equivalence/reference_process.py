"""TFF's own learning process for a TaskConfig, run round by round on the same client data."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from fcp_server.protos import plan_pb2, task_builder_pb2
from task_builder import data_spec, learning_process


@dataclasses.dataclass(frozen=True)
class ReferenceRound:
    """TFF's global trainable weights and aggregator measurements after one round."""

    weights: list[np.ndarray]
    aggregator: dict[str, Any]


def client_datasets(
    model: Any,
    config: task_builder_pb2.TaskConfig,
    plan: plan_pb2.ClientOnlyPlan,
    clients: Sequence[Sequence[bytes]],
) -> list[tf.data.Dataset]:
    """Each client's records through the reference input pipeline (`data_spec.client_dataset`)."""
    inputs = data_spec.describe_inputs(model.input_spec, config.label_name)
    return [
        data_spec.client_dataset(
            tf.data.Dataset.from_tensor_slices(list(records)), inputs, plan.data_spec
        )
        for records in clients
    ]


def run_reference(
    model: Any,
    config: task_builder_pb2.TaskConfig,
    datasets: Sequence[tf.data.Dataset],
    schedule: Sequence[Sequence[int]],
) -> list[ReferenceRound]:
    """Runs `learning_process.compose` (the DP aggregator included) for every round."""
    process = learning_process.compose(model, config, skip_dp_aggregator=False)
    state = process.initialize()
    rounds = []
    for participants in schedule:
        output = process.next(state, [datasets[c] for c in participants])
        state = output.state
        weights = [np.asarray(w) for w in process.get_model_weights(state).trainable]
        rounds.append(ReferenceRound(weights, dict(output.metrics["aggregator"])))
    return rounds
