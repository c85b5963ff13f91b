"""Runs a ClientOnlyPlan's TFLite device program over one device's examples.

This is the device half of FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", ClientUpdate) as TFF's client work computes it: for
every batch of `dataset.batch(b).take(max_batches)` per epoch, call the plan's training
signature (weights + client optimizer state + batch -> new weights/state + the batch's metric
state), starting from the round's checkpoint with a freshly zeroed client optimizer state.
The update follows the plan.proto contract: "trainable/<i>" = initial - trained (TFF's sign
convention), "num_examples" and the summed metric state "metric/<name>/<k>". When the plan
asks for it the update is clipped on the device to `local_clip_norm` (global L2 norm, as
tf.clip_by_global_norm); the server clips again regardless.
"""

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from client_sim import batching, examples
from fcp_server.protos import plan_pb2, task_builder_pb2

Array = np.ndarray[Any, Any]
MAX_PLAN_BYTES = 512 * 1024 * 1024
_INTERPRETER_CACHE = 2


class PlanError(Exception):
    """The plan or checkpoint cannot be executed (reported as FAILED_MODEL_COMPUTATION)."""


class ExampleError(Exception):
    """The device's examples do not match the plan (reported as FAILED_EXAMPLE_GENERATION)."""


@dataclass(frozen=True)
class PlanOutcome:
    """What one device computed for one task assignment."""

    # Safetensors bytes to upload.
    update: bytes
    # Example visits over all epochs.
    num_examples: int
    # Mean loss over the examples visited (for logs; the server uses the metric state).
    mean_loss: float
    # Global L2 norm of the update before the local clip.
    update_norm: float
    # True when the local clip scaled the update down.
    clipped: bool


def _tensor_array(data: dict[str, Array], name: str, spec: plan_pb2.TensorSpec) -> Array:
    if name not in data:
        raise PlanError(f"checkpoint has no tensor {name!r}")
    arr = data[name]
    if list(arr.shape) != list(spec.shape) or arr.dtype != np.dtype(spec.dtype):
        raise PlanError(
            f"checkpoint tensor {name!r} is {arr.dtype}{list(arr.shape)}, "
            f"the plan says {spec.dtype}{list(spec.shape)}"
        )
    return arr


def load_weights(checkpoint: bytes, model: plan_pb2.ModelSpec) -> tuple[list[Array], list[Array]]:
    """Reads the model weights of a client checkpoint (safetensors), checked against the plan.

    Raises:
      PlanError: for an unreadable checkpoint or missing / mismatched tensors.
    """
    try:
        data = st_load(checkpoint)
    except (SafetensorError, ValueError) as e:
        raise PlanError(f"unreadable checkpoint: {e}") from e
    trainable = [_tensor_array(data, f"trainable/{i}", s) for i, s in enumerate(model.trainable)]
    non_trainable = [
        _tensor_array(data, f"non_trainable/{i}", s) for i, s in enumerate(model.non_trainable)
    ]
    return trainable, non_trainable


def clip_global_norm(tensors: Sequence[Array], clip: float) -> tuple[list[Array], float, bool]:
    """Scales tensors so their global L2 norm is <= clip (no-op when clip <= 0).

    Returns:
      (clipped tensors, global norm before clipping, whether they were scaled).
    """
    norm = float(np.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in tensors)))
    if clip <= 0 or norm <= clip:
        return list(tensors), norm, False
    scale = clip / norm
    return [(t * scale).astype(t.dtype) for t in tensors], norm, True


class _Interpreters:
    """Per-thread cache of TFLite interpreters keyed by the program's hash.

    A TFLite interpreter is not thread-safe: two threads invoking one interpreter corrupt its
    buffers (seen as a process abort when a fleet ran plans inline in several session
    threads), so every thread keeps interpreters of its own.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, tflite_model: bytes) -> Any:
        cache: OrderedDict[str, Any] | None = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = OrderedDict()
        key = hashlib.sha256(tflite_model).hexdigest()
        if key not in cache:
            import tensorflow as tf

            try:
                interp = tf.lite.Interpreter(model_content=tflite_model)
            except ValueError as e:
                raise PlanError(f"invalid TFLite program: {e}") from e
            cache[key] = interp
            while len(cache) > _INTERPRETER_CACHE:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]


_INTERPRETERS = _Interpreters()


def warm_up() -> None:
    """Imports TensorFlow's TFLite interpreter, the seconds-long first step of any plan."""
    import tensorflow as tf

    _ = tf.lite.Interpreter


def _fed_sgd(plan: plan_pb2.ClientOnlyPlan) -> bool:
    return plan.algorithm == task_builder_pb2.LearningAlgo.FED_SGD


def _signature_name(plan: plan_pb2.ClientOnlyPlan) -> str:
    if plan.kind == plan_pb2.PlanKind.TRAINING and _fed_sgd(plan):
        name = plan.gradient_signature
    elif plan.kind == plan_pb2.PlanKind.TRAINING:
        name = plan.train_signature
    elif plan.kind == plan_pb2.PlanKind.EVALUATION:
        name = plan.eval_signature
    else:
        raise PlanError(f"unsupported plan kind {plan.kind}")
    if not name:
        raise PlanError("the plan names no signature for its kind")
    return name


def _batch_inputs(records: Sequence[bytes], spec: plan_pb2.DataSpec) -> dict[str, Array]:
    feature_specs = [*spec.features, spec.label]
    try:
        parsed = examples.parse_batch(records, feature_specs)
    except ValueError as e:
        raise ExampleError(str(e)) from e
    return {fs.input_name or fs.name: parsed[fs.name] for fs in feature_specs}


def metric_output_name(m: int, k: int) -> str:
    """Signature output of state tensor k of the plan's metric m (the builder's naming)."""
    return f"metric_{m}_{k}"


def _output(outputs: dict[str, Array], name: str) -> Array:
    if name not in outputs:
        raise PlanError(f"signature output {name!r} is missing (has {sorted(outputs)})")
    return np.asarray(outputs[name])


def run_plan(
    plan: plan_pb2.ClientOnlyPlan, checkpoint: bytes, records: Sequence[bytes]
) -> PlanOutcome:
    """Executes the plan on the device's records and returns the update to upload.

    Raises:
      PlanError: when the program/checkpoint cannot run; ExampleError for unusable examples.
    """
    if len(plan.tflite_model) > MAX_PLAN_BYTES:
        raise PlanError("TFLite program too large")
    try:
        bplan = batching.batch_plan(plan.data_spec)
    except ValueError as e:
        raise PlanError(str(e)) from e
    slices = batching.batch_slices(len(records), bplan)
    if not slices:
        raise ExampleError("the device has no examples")
    trainable, non_trainable = load_weights(checkpoint, plan.model)
    initial = [t.copy() for t in trainable]
    is_train_plan = plan.kind == plan_pb2.PlanKind.TRAINING
    training = is_train_plan and not _fed_sgd(plan)
    fed_sgd = is_train_plan and not training
    grad_sums = [np.zeros(t.shape, np.float64) for t in trainable] if fed_sgd else []
    opt_state = [
        np.zeros(list(s.shape), dtype=np.dtype(s.dtype)) for s in plan.client_optimizer_state
    ]
    runner = _INTERPRETERS.get(plan.tflite_model).get_signature_runner(_signature_name(plan))
    # (metric index m, state index k) -> running sum; the signature output is "metric_<m>_<k>".
    metric_sums = {
        (m, k): np.zeros(list(s.shape), np.float64)
        for m, metric in enumerate(plan.metrics)
        for k, s in enumerate(metric.state)
    }
    n_examples, loss_sum = 0, 0.0
    for start, stop in slices:
        inputs = _batch_inputs(records[start:stop], plan.data_spec)
        inputs.update({f"trainable_{i}": w for i, w in enumerate(trainable)})
        inputs.update({f"non_trainable_{i}": w for i, w in enumerate(non_trainable)})
        if training:
            inputs.update({f"opt_{i}": s for i, s in enumerate(opt_state)})
        try:
            outputs = runner(**inputs)
        except (ValueError, RuntimeError) as e:
            raise PlanError(f"TFLite signature failed: {e}") from e
        if training:
            trainable = [
                _output(outputs, f"trainable_{i}").astype(w.dtype) for i, w in enumerate(trainable)
            ]
            opt_state = [
                _output(outputs, f"opt_{i}").astype(s.dtype) for i, s in enumerate(opt_state)
            ]
        for i, acc in enumerate(grad_sums):
            acc += _output(outputs, f"grad_{i}")
        for (m, k), acc in metric_sums.items():
            acc += _output(outputs, metric_output_name(m, k)).reshape(acc.shape)
        n_examples += stop - start
        loss_sum += float(_output(outputs, "loss")) * (stop - start)
    delta = [(a - b).astype(a.dtype) for a, b in zip(initial, trainable, strict=True)]
    if grad_sums:
        # FedSGD (TFF fed_sgd): the device sends its example-weighted mean gradient, which
        # the server optimizer applies as it applies a FedAvg delta.
        delta = [(g / n_examples).astype(w.dtype) for w, g in zip(initial, grad_sums, strict=True)]
    return _outcome(plan, delta, metric_sums, n_examples, loss_sum)


def _outcome(
    plan: plan_pb2.ClientOnlyPlan,
    delta: list[Array],
    metric_sums: dict[tuple[int, int], Array],
    n_examples: int,
    loss_sum: float,
) -> PlanOutcome:
    tensors: dict[str, Array] = {}
    norm, clipped = 0.0, False
    if plan.kind == plan_pb2.PlanKind.TRAINING:
        delta, norm, clipped = clip_global_norm(delta, plan.local_clip_norm)
        if not all(np.all(np.isfinite(d)) for d in delta):
            raise PlanError("training produced a non-finite update")
        tensors.update({f"trainable/{i}": d for i, d in enumerate(delta)})
    tensors["num_examples"] = np.asarray(n_examples, dtype=np.int64)
    for (m, k), acc in metric_sums.items():
        metric = plan.metrics[m]
        dtype = np.dtype(metric.state[k].dtype or "float32")
        tensors[f"metric/{metric.name}/{k}"] = acc.astype(dtype)
    return PlanOutcome(
        update=st_save(tensors),
        num_examples=n_examples,
        mean_loss=loss_sum / max(n_examples, 1),
        update_norm=norm,
        clipped=clipped,
    )
