"""Optimizer specs, state layouts and update math shared by the TFF process and the device program.

The device program must take exactly the step TFF's client work takes
(`tff.learning.optimizers.build_sgdm` / `build_adam`, TFF 0.87), so the update rules here repeat
TFF's float32 expressions term for term. The client optimizer state starts at zero every round
(TFF re-initializes it per client update); the server optimizer state lives in the checkpoint.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf
import tensorflow_federated as tff

from fcp_server.protos import plan_pb2, task_builder_pb2

_Opt = task_builder_pb2.Optimizer

# TFF `build_adam` defaults; the config has no fields for them.
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7


@dataclasses.dataclass(frozen=True)
class StateSlot:
    """One optimizer state tensor: a label ("step", "accumulator/0"), its shape and dtype."""

    label: str
    shape: tuple[int, ...]
    dtype: str


def optimizer_spec(
    kind: int, learning_rate: float, momentum: float = 0.0
) -> plan_pb2.OptimizerSpec:
    """Builds the plan's OptimizerSpec (Adam gets TFF's default betas and epsilon)."""
    if kind not in (_Opt.SGD, _Opt.ADAM):
        raise ValueError(f"unsupported optimizer {kind}: expected SGD or ADAM")
    if not learning_rate > 0:
        raise ValueError(f"learning rate must be > 0, got {learning_rate}")
    spec = plan_pb2.OptimizerSpec(type=kind, learning_rate=learning_rate)  # type: ignore[arg-type]
    if kind == _Opt.ADAM:
        spec.beta_1, spec.beta_2, spec.epsilon = ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON
    else:
        spec.momentum = momentum
    return spec


def build_tff_optimizer(spec: plan_pb2.OptimizerSpec) -> tff.learning.optimizers.Optimizer:
    """The TFF optimizer the reference learning process uses for this spec."""
    if spec.type == _Opt.ADAM:
        return tff.learning.optimizers.build_adam(
            learning_rate=spec.learning_rate,
            beta_1=spec.beta_1,
            beta_2=spec.beta_2,
            epsilon=spec.epsilon,
        )
    return tff.learning.optimizers.build_sgdm(
        learning_rate=spec.learning_rate, momentum=spec.momentum or None
    )


def state_slots(
    spec: plan_pb2.OptimizerSpec, weight_shapes: Sequence[tuple[int, ...]]
) -> list[StateSlot]:
    """The optimizer's state tensors for trainable weights of the given shapes, in order."""
    if spec.type == _Opt.ADAM:
        return [
            StateSlot("step", (), "int64"),
            *(StateSlot(f"accumulator/{i}", s, "float32") for i, s in enumerate(weight_shapes)),
            *(StateSlot(f"preconditioner/{i}", s, "float32") for i, s in enumerate(weight_shapes)),
        ]
    if spec.momentum > 0:
        return [StateSlot(f"accumulator/{i}", s, "float32") for i, s in enumerate(weight_shapes)]
    return []


def zero_state(slots: Sequence[StateSlot]) -> list[npt.NDArray[Any]]:
    """Zero-initialised state (TFF `initialize`: step 0, zero accumulators)."""
    return [np.zeros(slot.shape, dtype=slot.dtype) for slot in slots]


def apply_update(
    spec: plan_pb2.OptimizerSpec,
    state: Sequence[tf.Tensor],
    weights: Sequence[tf.Tensor],
    gradients: Sequence[tf.Tensor],
) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    """One optimizer step in TF ops; returns (new_state, new_weights).

    Args:
        spec: The optimizer.
        state: Tensors laid out as `state_slots` says.
        weights: Trainable weights (float32).
        gradients: Gradients of the batch loss, one per weight.

    Returns:
        The new state and weights, with TFF's float32 arithmetic.
    """
    lr = tf.constant(spec.learning_rate, tf.float32)
    n = len(weights)
    if spec.type == _Opt.ADAM:
        beta_1 = tf.constant(spec.beta_1, tf.float32)
        beta_2 = tf.constant(spec.beta_2, tf.float32)
        epsilon = tf.constant(spec.epsilon, tf.float32)
        step = state[0] + 1
        t = tf.cast(step, tf.float32)
        normalized_lr = (
            lr * tf.math.sqrt(1.0 - tf.math.pow(beta_2, t)) / (1.0 - tf.math.pow(beta_1, t))
        )
        accs, pres, new_w = [], [], []
        for w, a, p, g in zip(weights, state[1 : n + 1], state[n + 1 :], gradients, strict=True):
            a = a + (g - a) * (1.0 - beta_1)
            p = p + (tf.math.square(g) - p) * (1.0 - beta_2)
            new_w.append(w - normalized_lr * a / (tf.math.sqrt(p) + epsilon))
            accs.append(a)
            pres.append(p)
        return [step, *accs, *pres], new_w
    if spec.momentum > 0:
        momentum = tf.constant(spec.momentum, tf.float32)
        new_state, new_w = [], []
        for w, a, g in zip(weights, state, gradients, strict=True):
            a = momentum * a + g
            new_state.append(a)
            new_w.append(w - lr * a)
        return new_state, new_w
    return [], [w - lr * g for w, g in zip(weights, gradients, strict=True)]
