"""Builds a task's plans: ClientOnlyPlan + ServerPlan (+ initial checkpoint) per task.

The artifacts of ODP's `artifact_utils.py` (plan, client-only plan, initial server checkpoint,
flex-op check and min client version), re-expressed for FCP's plan.proto contract: the device
program is a TFLite model with explicit signatures (device_program.py), the checkpoint is
safetensors, and the server half is declarative (server_plan.py). A training task is built for
TRAINING_ONLY / TRAINING_AND_EVAL, an evaluation task for TRAINING_AND_EVAL / EVAL_ONLY.
"""

import dataclasses
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import safetensors.numpy
import tensorflow as tf
import tensorflow_federated as tff

from fcp_server.aggregation.state import ModelWeights
from fcp_server.protos import plan_pb2, task_builder_pb2
from task_builder import (
    data_spec,
    device_program,
    flex_ops,
    learning_process,
    metric_specs,
    model_versions,
    optimizer_math,
    server_plan,
)
from task_builder.errors import ArtifactBuildError, TaskConfigError

_Mode = task_builder_pb2.TaskMode
_Algo = task_builder_pb2.LearningAlgo
_Kind = plan_pb2.PlanKind
# The one DP type whose device may clip its own update: its clip is fixed and nothing happens
# to an update before the clip. The tree types first zero an update whose L-inf norm exceeds
# 100 x clip (`zeroing_factory`); a device-side clip would turn such an update into a counted,
# clipped contribution instead of zeros, so for them only the server clips.
_LOCAL_CLIP_DP = task_builder_pb2.DpAggregator.FIXED_GAUSSIAN


@dataclasses.dataclass(frozen=True)
class TaskPlans:
    """The artifacts of one task."""

    client_plan: plan_pb2.ClientOnlyPlan
    server_plan: plan_pb2.ServerPlan
    initial_checkpoint: bytes | None  # safetensors; None for evaluation tasks
    flex_ops: list[str]
    min_client_version: str


@dataclasses.dataclass(frozen=True)
class BuiltPlans:
    """The training and/or evaluation task artifacts a config asks for."""

    training: TaskPlans | None
    evaluation: TaskPlans | None


def build_model_spec(model: tff.learning.models.FunctionalModel) -> plan_pb2.ModelSpec:
    """Checkpoint names `trainable/<i>`, `non_trainable/<i>` with shapes and dtypes."""
    trainable, non_trainable = model.initial_weights
    spec = plan_pb2.ModelSpec()
    for prefix, weights, out in (
        ("trainable", trainable, spec.trainable),
        ("non_trainable", non_trainable, spec.non_trainable),
    ):
        for i, w in enumerate(weights):
            array = np.asarray(w)
            out.add(name=f"{prefix}/{i}", shape=list(array.shape), dtype=array.dtype.name)
    return spec


def build_initial_checkpoint(
    model: tff.learning.models.FunctionalModel,
    server: plan_pb2.ServerPlan,
    initial_weights: ModelWeights | None = None,
) -> bytes:
    """Safetensors bytes: the initial weights plus zero server optimizer state.

    Args:
        model: The FunctionalModel; its `initial_weights` start training by default.
        server: The training ServerPlan (for the server optimizer state tensors).
        initial_weights: Warm start: these weights instead of the model's, already checked
            against the ModelSpec (`model_versions.check_weights`). The server optimizer
            state still starts at zero, as for a fresh TFF `optimizer.initialize`.
    """
    if initial_weights is None:
        trainable, non_trainable = model.initial_weights
    else:
        trainable, non_trainable = initial_weights.trainable, initial_weights.non_trainable
    tensors: dict[str, npt.NDArray[Any]] = {}
    for i, w in enumerate(trainable):
        tensors[f"trainable/{i}"] = np.ascontiguousarray(w)
    for i, w in enumerate(non_trainable):
        tensors[f"non_trainable/{i}"] = np.ascontiguousarray(w)
    for spec in server.server_optimizer_state:
        tensors[spec.name] = np.zeros(tuple(spec.shape), dtype=spec.dtype)
    return bytes(safetensors.numpy.save(tensors, metadata={"format": "fcp-server-checkpoint"}))


def _prediction_size(
    model: tff.learning.models.FunctionalModel, inputs: data_spec.ModelInputs
) -> int:
    """Prediction elements per example, from a forward pass on one zero example."""
    batch = [tf.zeros([1, *t.shape], t.parsed_dtype) for t in (*inputs.features, inputs.label)]
    x, _ = data_spec.to_model_batch(inputs, batch)
    output = model.predict_on_batch(model.initial_weights, x, False)
    return max(1, int(math.prod(tf.nest.flatten(output)[0].shape[1:])))


def _tensor_specs(slots: list[optimizer_math.StateSlot]) -> list[plan_pb2.TensorSpec]:
    return [
        plan_pb2.TensorSpec(name=f"opt_{k}", shape=list(s.shape), dtype=s.dtype, label=s.label)
        for k, s in enumerate(slots)
    ]


def _check_ops(
    tflite: bytes, *, skip: bool, allowlist: dict[str, str] | None
) -> flex_ops.FlexOpsReport:
    if skip or allowlist is None:
        return flex_ops.list_flex_ops(tflite)
    return flex_ops.check_flex_ops(tflite, allowlist)


@dataclasses.dataclass(frozen=True)
class _Common:
    """What the training and the evaluation plan share."""

    model: Any  # the FunctionalModel
    inputs: data_spec.ModelInputs
    model_spec: plan_pb2.ModelSpec
    metric_names: tuple[str, ...]
    metrics: list[plan_pb2.MetricSpec]
    skip_flex: bool
    allowlist: dict[str, str] | None
    initial_weights: ModelWeights | None = None  # warm start; None = the model's own


def _data_spec(
    common: _Common, config: task_builder_pb2.TaskConfig, *, selector: str, epochs: int
) -> plan_pb2.DataSpec:
    ds = config.policies.dataset_policy
    try:
        return data_spec.build_data_spec(
            common.inputs,
            batch_size=ds.batch_size,
            max_batches=ds.max_training_batches_per_client or -1,
            num_epochs=epochs,
            example_selector_uri=selector,
        )
    except ValueError as e:
        raise TaskConfigError(f"Task config is invalid: {e}") from e


def _training(
    common: _Common, config: task_builder_pb2.TaskConfig, skip_dp_aggregator: bool
) -> TaskPlans:
    lp = config.federated_learning.learning_process
    algorithm = lp.type or _Algo.FED_AVG
    client_opt = (
        None if algorithm == _Algo.FED_SGD else learning_process.client_optimizer_spec(config)
    )
    tflite, slots = device_program.build_device_program(
        device_program.ProgramSpec(
            model=common.model,
            inputs=common.inputs,
            metric_names=common.metric_names,
            client_optimizer=client_opt,
            with_gradient=algorithm == _Algo.FED_SGD,
            with_eval=False,
        )
    )
    report = _check_ops(tflite, skip=common.skip_flex, allowlist=common.allowlist)
    dp = config.differential_privacy
    client = plan_pb2.ClientOnlyPlan(
        kind=_Kind.TRAINING,
        tflite_model=tflite,
        data_spec=_data_spec(
            common,
            config,
            selector=lp.runtime_config.example_selector_uri,
            epochs=max(1, config.policies.dataset_policy.num_epochs),
        ),
        model=common.model_spec,
        algorithm=algorithm,
        client_optimizer_state=_tensor_specs(slots),
        metrics=common.metrics,
        flex_ops=report.flex_ops,
        min_client_version=report.min_client_version,
    )
    if client_opt is not None:
        client.client_optimizer.CopyFrom(client_opt)
        client.train_signature = device_program.TRAIN_SIGNATURE
    else:
        client.gradient_signature = device_program.GRADIENT_SIGNATURE
    if not skip_dp_aggregator and (dp.type or _LOCAL_CLIP_DP) == _LOCAL_CLIP_DP:
        client.local_clip_norm = dp.clip_norm  # the server clips again either way
    server = server_plan.training_server_plan(
        config,
        model_spec=common.model_spec,
        metrics=common.metrics,
        skip_dp_aggregator=skip_dp_aggregator,
    )
    checkpoint = build_initial_checkpoint(common.model, server, common.initial_weights)
    return TaskPlans(client, server, checkpoint, report.flex_ops, report.min_client_version)


def _evaluation(common: _Common, config: task_builder_pb2.TaskConfig) -> TaskPlans:
    tflite, _ = device_program.build_device_program(
        device_program.ProgramSpec(
            model=common.model,
            inputs=common.inputs,
            metric_names=common.metric_names,
            client_optimizer=None,
            with_gradient=False,
            with_eval=True,
        )
    )
    report = _check_ops(tflite, skip=common.skip_flex, allowlist=common.allowlist)
    client = plan_pb2.ClientOnlyPlan(
        kind=_Kind.EVALUATION,
        tflite_model=tflite,
        data_spec=_data_spec(
            common,
            config,
            selector=config.federated_learning.evaluation.example_selector_uri,
            epochs=1,
        ),
        model=common.model_spec,
        algorithm=config.federated_learning.learning_process.type or _Algo.FED_AVG,
        metrics=common.metrics,
        eval_signature=device_program.EVAL_SIGNATURE,
        flex_ops=report.flex_ops,
        min_client_version=report.min_client_version,
    )
    server = server_plan.eval_server_plan(
        config, model_spec=common.model_spec, metrics=common.metrics
    )
    return TaskPlans(client, server, None, report.flex_ops, report.min_client_version)


def build_plans(
    model: tff.learning.models.FunctionalModel,
    config: task_builder_pb2.TaskConfig,
    *,
    skip_dp_aggregator: bool,
    skip_flex_ops_check: bool,
    allowlist_path: str | None = None,
    initial_weights: ModelWeights | None = None,
) -> BuiltPlans:
    """Builds the plans of a validated config.

    Warm start: with `initial_weights` (e.g. a round of an earlier task, read by
    `model_versions.load_version_weights`), the training task's initial checkpoint carries
    those weights instead of the model's. Only the weights carry over: the server optimizer
    state (momentum, Adam moments) and the DP aggregator state start fresh, and the new task's
    DP accounting covers the new task only (a device in both tasks spends both budgets).

    Args:
        model: The loaded FunctionalModel (`model_loading.load_model`).
        config: The validated, normalized TaskConfig.
        skip_dp_aggregator: Build the training plan without a DP aggregator.
        skip_flex_ops_check: Build even if Flex ops are not allowlisted (min version "0").
        allowlist_path: The flex-op allowlist CSV (default: configs/flex_ops_allowlist.csv).
        initial_weights: Warm-start weights, validated here against the model's ModelSpec.

    Returns:
        The training and/or evaluation TaskPlans the config's mode asks for.

    Raises:
        ModelLoadError: The model's inputs cannot be read from tf.Examples.
        ModelVersionError: `initial_weights` do not fit the model (names the tensor).
        TaskConfigError: The config cannot be built (mode, DP, optimizer).
        FlexOpsError: The device program needs ops outside the allowlist.
        ArtifactBuildError: Conversion or serialization failed.
    """
    mode = config.mode
    if mode not in (_Mode.TRAINING_ONLY, _Mode.TRAINING_AND_EVAL, _Mode.EVAL_ONLY):
        raise TaskConfigError(f"task mode {mode} is not TRAINING_ONLY/TRAINING_AND_EVAL/EVAL_ONLY")
    model_spec = build_model_spec(model)
    if initial_weights is not None:
        initial_weights = model_versions.check_weights(initial_weights, model_spec)
    inputs = data_spec.describe_inputs(model.input_spec, config.label_name)
    names = tuple(learning_process.accepted_metric_names(config))
    try:
        metrics = metric_specs.build_metric_specs(names, _prediction_size(model, inputs))
    except (ValueError, TypeError, tf.errors.OpError) as e:
        raise ArtifactBuildError(f"Cannot build the metric specs: {e}") from e
    common = _Common(
        model=model,
        inputs=inputs,
        model_spec=model_spec,
        metric_names=names,
        metrics=metrics,
        skip_flex=skip_flex_ops_check,
        allowlist=None if skip_flex_ops_check else flex_ops.load_allowlist(allowlist_path),
        initial_weights=initial_weights,
    )
    training = None if mode == _Mode.EVAL_ONLY else _training(common, config, skip_dp_aggregator)
    evaluation = None if mode == _Mode.TRAINING_ONLY else _evaluation(common, config)
    return BuiltPlans(training=training, evaluation=evaluation)
