"""Builds the device program: a TFLite flatbuffer with train / gradient / evaluate signatures.

Each signature is one batch of TFF's client work (TFF 0.87
`build_functional_model_delta_update`, `fed_sgd._build_functional_client_update`,
`fed_eval._build_functional_local_evaluation`): forward pass (training=True except for eval),
loss, gradient, optimizer step, and the metric state of that batch. Weights and optimizer state
travel through signature inputs and outputs (no TFLite variables), so the device loops over
batches and sums the metric states; devices resize the batch dimension for the last partial
batch. Converted with TFLITE_BUILTINS + SELECT_TF_OPS; which Flex ops may appear is decided
afterwards by the allowlist (flex_ops.py), as FCP converts with all select-TF ops allowed.
"""

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.lite.python.convert_phase import ConverterError

from fcp_server.protos import plan_pb2
from task_builder import data_spec, metric_specs, optimizer_math
from task_builder.errors import ArtifactBuildError

TRAIN_SIGNATURE = "train"
GRADIENT_SIGNATURE = "gradient"
EVAL_SIGNATURE = "evaluate"


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """What one device program computes."""

    model: tff.learning.models.FunctionalModel
    inputs: data_spec.ModelInputs
    metric_names: tuple[str, ...]  # accepted metrics, `loss` excluded
    # Client optimizer for the train signature; None builds no train signature.
    client_optimizer: plan_pb2.OptimizerSpec | None
    with_gradient: bool
    with_eval: bool


def trainable_name(i: int) -> str:
    """Signature name of trainable weight i."""
    return f"trainable_{i}"


def metric_output_name(m: int, k: int) -> str:
    """Signature output of state tensor k of metric m (index in the plan's metrics list)."""
    return f"metric_{m}_{k}"


class _Program:
    """Traces the signature functions of one ProgramSpec."""

    def __init__(self, spec: ProgramSpec) -> None:
        self._spec = spec
        trainable, non_trainable = spec.model.initial_weights
        self._n_train = len(trainable)
        self._n_non = len(non_trainable)
        self._weight_specs = [
            tf.TensorSpec(w.shape, tf.as_dtype(w.dtype), name=trainable_name(i))
            for i, w in enumerate(trainable)
        ] + [
            tf.TensorSpec(w.shape, tf.as_dtype(w.dtype), name=f"non_trainable_{i}")
            for i, w in enumerate(non_trainable)
        ]
        self._batch_specs = data_spec.signature_input_specs(spec.inputs)
        self._init_metrics, self._update_metrics, _ = metric_specs.build_metric_fns(
            spec.metric_names
        )
        self._opt_slots: list[optimizer_math.StateSlot] = []
        if spec.client_optimizer is not None:
            self._opt_slots = optimizer_math.state_slots(
                spec.client_optimizer, [tuple(w.shape) for w in trainable]
            )

    def _split(self, args: Sequence[tf.Tensor], n_opt: int) -> tuple[Any, list[tf.Tensor], Any]:
        trainable = tuple(args[: self._n_train])
        rest = args[self._n_train :]
        non_trainable = tuple(rest[: self._n_non])
        rest = rest[self._n_non :]
        opt_state, batch = list(rest[:n_opt]), list(rest[n_opt:])
        x, y = data_spec.to_model_batch(self._spec.inputs, batch)
        return (trainable, non_trainable), opt_state, (x, y)

    def _forward(self, weights: Any, x: Any, y: Any, training: bool) -> tuple[Any, tf.Tensor]:
        output = self._spec.model.predict_on_batch(weights, x, training)
        return output, self._spec.model.loss(output=output, label=y)

    def _batch_outputs(self, output: Any, loss: tf.Tensor, y: Any) -> dict[str, tf.Tensor]:
        num_examples = tf.shape(tf.nest.flatten(output)[0])[0]
        state = self._update_metrics(
            self._init_metrics(),
            y,
            tff.learning.models.BatchOutput(
                loss=loss, predictions=output, num_examples=num_examples
            ),
        )
        result = {"loss": loss, "num_examples": tf.cast(num_examples, tf.int64)}
        names = [metric_specs.LOSS_METRIC, *self._spec.metric_names]
        for m, name in enumerate(names):
            for k, tensor in enumerate(metric_specs.canonical_state(name, list(state[name]))):
                result[metric_output_name(m, k)] = tf.cast(tensor, tf.float32)
        return result

    def train(self) -> tf.types.experimental.ConcreteFunction:
        opt = self._spec.client_optimizer
        assert opt is not None
        opt_specs = [
            tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=f"opt_{k}")
            for k, s in enumerate(self._opt_slots)
        ]

        def train(*args: tf.Tensor) -> dict[str, tf.Tensor]:
            weights, opt_state, (x, y) = self._split(args, len(opt_specs))
            with tf.GradientTape() as tape:
                tape.watch(weights[0])
                output, loss = self._forward(weights, x, y, training=True)
            grads = tape.gradient(loss, weights[0], unconnected_gradients="zero")
            new_state, new_weights = optimizer_math.apply_update(
                opt, opt_state, list(weights[0]), list(grads)
            )
            result = self._batch_outputs(output, loss, y)
            result.update({trainable_name(i): w for i, w in enumerate(new_weights)})
            result.update({f"opt_{k}": s for k, s in enumerate(new_state)})
            return result

        return self._concrete(train, [*self._weight_specs, *opt_specs, *self._batch_specs])

    def gradient(self) -> tf.types.experimental.ConcreteFunction:
        def gradient(*args: tf.Tensor) -> dict[str, tf.Tensor]:
            weights, _, (x, y) = self._split(args, 0)
            with tf.GradientTape() as tape:
                tape.watch(weights[0])
                output, loss = self._forward(weights, x, y, training=True)
            grads = tape.gradient(loss, weights[0], unconnected_gradients="zero")
            result = self._batch_outputs(output, loss, y)
            # FedSGD sums num_examples-weighted batch gradients (TFF fed_sgd reduce_fn).
            count = tf.cast(result["num_examples"], tf.float32)
            result.update({f"grad_{i}": count * g for i, g in enumerate(grads)})
            return result

        return self._concrete(gradient, [*self._weight_specs, *self._batch_specs])

    def evaluate(self) -> tf.types.experimental.ConcreteFunction:
        def evaluate(*args: tf.Tensor) -> dict[str, tf.Tensor]:
            weights, _, (x, y) = self._split(args, 0)
            output, loss = self._forward(weights, x, y, training=False)
            return self._batch_outputs(output, loss, y)

        return self._concrete(evaluate, [*self._weight_specs, *self._batch_specs])

    @staticmethod
    def _concrete(
        fn: Callable[..., dict[str, tf.Tensor]], signature: list[tf.TensorSpec]
    ) -> tf.types.experimental.ConcreteFunction:
        return tf.function(fn, input_signature=signature, autograph=False).get_concrete_function()

    @property
    def optimizer_slots(self) -> list[optimizer_math.StateSlot]:
        return self._opt_slots


def _convert(signatures: dict[str, Any]) -> bytes:
    # Through a SavedModel so that every signature keeps its name (from_concrete_functions
    # names a single function "serving_default").
    with tempfile.TemporaryDirectory(prefix="fcp-program-") as tmp:
        tf.saved_model.save(tf.Module(), tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(signatures))
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS,
            tf.lite.OpsSet.SELECT_TF_OPS,
        ]
        # As FCP: every TF op may become a Flex op; the allowlist check decides afterwards.
        converter._experimental_allow_all_select_tf_ops = True
        result: bytes = converter.convert()
        return result


def build_device_program(spec: ProgramSpec) -> tuple[bytes, list[optimizer_math.StateSlot]]:
    """Converts the ProgramSpec's signatures to one TFLite flatbuffer.

    Args:
        spec: The model, inputs, metrics and which signatures to build.

    Returns:
        The flatbuffer and the client optimizer state slots (inputs/outputs `opt_<k>`).

    Raises:
        ArtifactBuildError: Tracing or TFLite conversion failed.
    """
    program = _Program(spec)
    try:
        signatures = {}
        if spec.client_optimizer is not None:
            signatures[TRAIN_SIGNATURE] = program.train()
        if spec.with_gradient:
            signatures[GRADIENT_SIGNATURE] = program.gradient()
        if spec.with_eval:
            signatures[EVAL_SIGNATURE] = program.evaluate()
        if not signatures:
            raise ValueError("the program has no signature")
        tflite = _convert(signatures)
    except (ValueError, TypeError, OSError, tf.errors.OpError, ConverterError) as e:
        raise ArtifactBuildError(f"Cannot build the device program: {e}") from e
    return tflite, program.optimizer_slots
