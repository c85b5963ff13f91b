"""The path a metric takes in production, from a saved model to the round's metrics file.

Builder: the case's Keras model becomes a saved FunctionalModel, is loaded back as the builder
loads adopters' models, and an EVAL_ONLY config with the case's metrics is built into plans
(TFLite device program, flex ops checked against the allowlist). Devices: each client's
examples are tf.Examples run through that program by the simulated device runtime, which
uploads the summed metric state. Server: each upload is decoded and validated against the
server plan, clamped and summed by the round accumulator, and finalized as an eval round.
"""

import dataclasses
import pathlib

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from google.protobuf import text_format

from client_sim import examples, plan_runtime
from fcp_server import checkpoints
from fcp_server.aggregation import fedavg
from fcp_server.aggregation.accumulator import RoundAccumulator
from fcp_server.aggregation.state import ClientUpdate, ModelWeights
from fcp_server.protos import task_builder_pb2
from task_builder import model_loading, plans
from task_builder.examples import save_models
from tests.integration.metrics_equivalence import cases

EVAL_PREFIX = "server/client_work/eval/"
_MAX_UPDATE_BYTES = 1 << 24


@dataclasses.dataclass(frozen=True)
class ClientData:
    """The union of the examples and its split over devices (consecutive slices)."""

    x: np.ndarray
    y: np.ndarray
    sizes: tuple[int, ...]

    def device(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of device i."""
        start = sum(self.sizes[:i])
        stop = start + self.sizes[i]
        return self.x[start:stop], self.y[start:stop]


@dataclasses.dataclass(frozen=True)
class Built:
    """A case's loaded model and its evaluation plans."""

    model: tff.learning.models.FunctionalModel
    task: plans.TaskPlans


def make_data(case: cases.ModelCase, seed: int) -> ClientData:
    """Random features and the case's labels for every device of `cases.CLIENT_SIZES`."""
    rng = np.random.default_rng(seed)
    n = sum(cases.CLIENT_SIZES)
    x = rng.normal(0.0, 1.5, size=(n, cases.NUM_FEATURES)).astype(np.float32)
    return ClientData(x, case.labels(rng, n), cases.CLIENT_SIZES)


def _config(metrics: tuple[str, ...]) -> task_builder_pb2.TaskConfig:
    metric_text = " ".join(f'metrics {{ name: "{m}" }}' for m in metrics)
    text = f"""
      mode: EVAL_ONLY population_name: "metrics"
      policies {{
        model_release_policy {{ num_max_training_rounds: 1 }}
        dataset_policy {{ batch_size: {cases.BATCH_SIZE} }}
      }}
      federated_learning {{
        learning_process {{ type: FED_AVG {metric_text} }}
        evaluation {{ report_goal: {len(cases.CLIENT_SIZES)} example_selector_uri: "app://eval"
                      source_training_task_id: 1 }}
      }}
    """
    return text_format.Parse(text, task_builder_pb2.TaskConfig())


def build(case: cases.ModelCase, workdir: pathlib.Path, seed: int) -> Built:
    """Saves the case's model, loads it as the builder does and builds the eval plans."""
    x_spec = tf.TensorSpec([None, cases.NUM_FEATURES], tf.float32)
    model = tff.learning.models.functional_model_from_keras(
        lambda: case.keras_model(seed), loss_fn=case.loss(), input_spec=(x_spec, case.label_spec)
    )
    path = workdir / case.name
    save_models.save_functional_model(model, str(path))
    loaded = model_loading.load_model(str(path))
    built = plans.build_plans(
        loaded, _config(case.metrics), skip_dp_aggregator=True, skip_flex_ops_check=False
    )
    assert built.evaluation is not None and built.training is None
    return Built(loaded, built.evaluation)


def _records(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    return [examples.encode_example({"x": xi, "y": yi}) for xi, yi in zip(x, y, strict=True)]


def run_devices(built: Built, data: ClientData) -> list[ClientUpdate]:
    """Every device's upload, as the server decodes and validates it."""
    trainable, non_trainable = built.model.initial_weights
    weights = ModelWeights(
        tuple(np.asarray(w) for w in trainable), tuple(np.asarray(w) for w in non_trainable)
    )
    checkpoint = checkpoints.encode_client_checkpoint(weights)
    updates = []
    for i in range(len(data.sizes)):
        outcome = plan_runtime.run_plan(
            built.task.client_plan, checkpoint, _records(*data.device(i))
        )
        updates.append(
            checkpoints.decode_update(
                outcome.update, built.task.server_plan, max_bytes=_MAX_UPDATE_BYTES
            )
        )
    return updates


def server_metrics(built: Built, updates: list[ClientUpdate]) -> dict[str, float]:
    """The eval round's finalized metrics by metric name (the metrics file, unprefixed)."""
    accumulator = RoundAccumulator(built.task.server_plan)
    for update in updates:
        accumulator.add(update)
    values = fedavg.finalize_evaluation(accumulator, built.task.server_plan)
    return {k[len(EVAL_PREFIX) :]: v for k, v in values.items() if k.startswith(EVAL_PREFIX)}


def union_predictions(built: Built, data: ClientData) -> tf.Tensor:
    """The model's predictions (inference mode) on the union of the devices' examples."""
    return built.model.predict_on_batch(built.model.initial_weights, tf.constant(data.x), False)


def union_reference(built: Built, data: ClientData, names: tuple[str, ...]) -> dict[str, float]:
    """Keras' values on the union: `loss` plus each named metric."""
    predictions = union_predictions(built, data)
    labels = tf.constant(data.y)
    values = {"loss": float(built.model.loss(output=predictions, label=labels))}
    values.update({n: cases.KERAS_REFERENCE[n](labels, predictions) for n in names})
    return values
