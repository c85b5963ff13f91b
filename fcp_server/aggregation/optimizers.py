"""Server optimizers that apply the round's mean update to the global model.

The math is exactly TFF 0.87's `tff.learning.optimizers.build_sgdm` and `build_adam` (the mean
update is `initial - trained` weights and is treated as a gradient, Reddi et al. 2021,
"Adaptive Federated Optimization", arXiv 2003.00295), computed in each weight's own dtype like
TFF does:

* SGD: `w -= lr * g`.
* SGD with momentum m > 0: `v = m * v + g; w -= lr * v`.
* Adam, with step t counted from 1:
  `a += (g - a) * (1 - beta_1); s += (g^2 - s) * (1 - beta_2);`
  `w -= lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * a / (sqrt(s) + epsilon)`
  (epsilon is added outside the square root, to the un-corrected sqrt(s)).

State is a flat map of numpy arrays so it goes into the server checkpoint under
"server_optimizer/<name>": "accumulator/<i>" (momentum SGD and Adam), "preconditioner/<i>" and
"step" (int64 scalar; Adam). Hyperparameters are not state: they come from the plan's
OptimizerSpec every round.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from fcp_server.aggregation.state import Tensor, Tensors
from fcp_server.protos import plan_pb2, task_builder_pb2

STATE_PREFIX = "server_optimizer/"
_STEP = "step"

OptimizerState = dict[str, Tensor]


class ServerOptimizer(Protocol):
    """A TFF-style optimizer over the trainable weights."""

    def initialize(self, weights: Sequence[Tensor]) -> OptimizerState:
        """Returns the zero state for weights shaped like `weights`."""
        ...

    def next(
        self, state: Mapping[str, Tensor], weights: Sequence[Tensor], update: Sequence[Tensor]
    ) -> tuple[OptimizerState, Tensors]:
        """Applies one step; returns (new state, new weights)."""
        ...


def _slot_names(slot: str, count: int) -> list[str]:
    return [f"{slot}/{i}" for i in range(count)]


def _check_step_inputs(
    state: Mapping[str, Tensor],
    weights: Sequence[Tensor],
    update: Sequence[Tensor],
    expected_keys: list[str],
) -> None:
    if len(weights) != len(update):
        raise ValueError(f"Optimizer got {len(weights)} weights but {len(update)} updates.")
    for i, (w, g) in enumerate(zip(weights, update, strict=True)):
        if w.shape != g.shape or w.dtype != g.dtype:
            raise ValueError(
                f"Update {i} is {g.dtype}{list(g.shape)}, weight {i} is {w.dtype}{list(w.shape)}."
            )
    if sorted(state) != sorted(expected_keys):
        raise ValueError(
            f"Optimizer state has keys {sorted(state)}, expected {sorted(expected_keys)}."
        )


@dataclasses.dataclass(frozen=True)
class Sgd:
    """Gradient descent, with momentum when `momentum` > 0 (TFF `build_sgdm`)."""

    learning_rate: float
    momentum: float = 0.0

    def __post_init__(self) -> None:
        """Validates the hyperparameters with TFF's ranges."""
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0.0):
            raise ValueError(f"SGD learning_rate must be >= 0, found {self.learning_rate}.")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"SGD momentum must be in [0, 1], found {self.momentum}.")

    def initialize(self, weights: Sequence[Tensor]) -> OptimizerState:
        """Returns no state for plain SGD, a zero velocity per weight with momentum."""
        if self.momentum == 0.0:
            return {}
        names = _slot_names("accumulator", len(weights))
        return {n: np.zeros_like(w) for n, w in zip(names, weights, strict=True)}

    def next(
        self, state: Mapping[str, Tensor], weights: Sequence[Tensor], update: Sequence[Tensor]
    ) -> tuple[OptimizerState, Tensors]:
        """Applies `w -= lr * g`, or `v = m * v + g; w -= lr * v` with momentum.

        Raises:
            ValueError: If shapes/dtypes or state keys do not match.
        """
        names = _slot_names("accumulator", len(weights)) if self.momentum else []
        _check_step_inputs(state, weights, update, names)
        if not self.momentum:
            new_weights = tuple(
                _sgd_step(w, g, self.learning_rate) for w, g in zip(weights, update, strict=True)
            )
            return {}, new_weights
        new_state: OptimizerState = {}
        new_w = []
        for name, w, g in zip(names, weights, update, strict=True):
            v = w.dtype.type(self.momentum) * state[name] + g
            new_state[name] = v
            new_w.append(w - w.dtype.type(self.learning_rate) * v)
        return new_state, tuple(new_w)


@dataclasses.dataclass(frozen=True)
class Adam:
    """Adam as TFF `build_adam` (bias correction folded into the learning rate)."""

    learning_rate: float
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def __post_init__(self) -> None:
        """Validates the hyperparameters (beta_1 < 1 so the bias correction is defined)."""
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0.0):
            raise ValueError(f"Adam learning_rate must be >= 0, found {self.learning_rate}.")
        if not 0.0 <= self.beta_1 < 1.0:
            raise ValueError(f"Adam beta_1 must be in [0, 1), found {self.beta_1}.")
        if not 0.0 <= self.beta_2 <= 1.0:
            raise ValueError(f"Adam beta_2 must be in [0, 1], found {self.beta_2}.")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0.0):
            raise ValueError(f"Adam epsilon must be >= 0, found {self.epsilon}.")

    def _names(self, count: int) -> tuple[list[str], list[str]]:
        return _slot_names("accumulator", count), _slot_names("preconditioner", count)

    def initialize(self, weights: Sequence[Tensor]) -> OptimizerState:
        """Returns step 0 and zero first/second moment estimates."""
        acc_names, pre_names = self._names(len(weights))
        state: OptimizerState = {_STEP: np.array(0, dtype=np.int64)}
        for a, p, w in zip(acc_names, pre_names, weights, strict=True):
            state[a] = np.zeros_like(w)
            state[p] = np.zeros_like(w)
        return state

    def next(
        self, state: Mapping[str, Tensor], weights: Sequence[Tensor], update: Sequence[Tensor]
    ) -> tuple[OptimizerState, Tensors]:
        """Applies one Adam step (see the module docstring for the formula).

        Raises:
            ValueError: If shapes/dtypes or state keys do not match.
        """
        acc_names, pre_names = self._names(len(weights))
        _check_step_inputs(state, weights, update, [_STEP, *acc_names, *pre_names])
        step = int(state[_STEP]) + 1
        new_state: OptimizerState = {_STEP: np.array(step, dtype=np.int64)}
        new_w = []
        for a_name, p_name, w, g in zip(acc_names, pre_names, weights, update, strict=True):
            f = w.dtype.type  # TFF computes in the weight's dtype (float32 for Keras models).
            one = f(1.0)
            lr_t = f(self.learning_rate) * np.sqrt(one - f(self.beta_2) ** step)
            lr_t = lr_t / (one - f(self.beta_1) ** step)
            a = state[a_name] + (g - state[a_name]) * (one - f(self.beta_1))
            p = state[p_name] + (np.square(g) - state[p_name]) * (one - f(self.beta_2))
            new_state[a_name], new_state[p_name] = a, p
            new_w.append(w - lr_t * a / (np.sqrt(p) + f(self.epsilon)))
        return new_state, tuple(new_w)


def build_server_optimizer(spec: plan_pb2.OptimizerSpec) -> ServerOptimizer:
    """Returns the optimizer the plan asks for.

    Args:
        spec: `ServerPlan.server_optimizer`; Adam's betas and epsilon are used as given, so
            the task builder must write TFF's defaults (0.9, 0.999, 1e-7) explicitly.

    Raises:
        ValueError: For an unknown type or out-of-range hyperparameters.
    """
    if spec.type == task_builder_pb2.Optimizer.SGD:
        return Sgd(learning_rate=spec.learning_rate, momentum=spec.momentum)
    if spec.type == task_builder_pb2.Optimizer.ADAM:
        return Adam(spec.learning_rate, spec.beta_1, spec.beta_2, spec.epsilon)
    raise ValueError(f"Unsupported server optimizer type {spec.type} in the plan.")


def state_specs(
    spec: plan_pb2.OptimizerSpec, model: plan_pb2.ModelSpec
) -> list[plan_pb2.TensorSpec]:
    """Returns the checkpoint TensorSpecs ("server_optimizer/<name>") of the optimizer state.

    The task builder can write these into `ServerPlan.server_optimizer_state`; the server
    checks a plan's list against them.

    Args:
        spec: The server optimizer.
        model: The model whose trainable tensors the optimizer updates.

    Raises:
        ValueError: As `build_server_optimizer`.
    """
    optimizer = build_server_optimizer(spec)
    zeros = [np.zeros(tuple(t.shape), dtype=np.dtype(t.dtype)) for t in model.trainable]
    state = optimizer.initialize(zeros)
    return [
        plan_pb2.TensorSpec(
            name=STATE_PREFIX + name, shape=list(value.shape), dtype=str(value.dtype)
        )
        for name, value in state.items()
    ]


def _sgd_step(w: Tensor, g: Tensor, learning_rate: float) -> Tensor:
    """Returns w - lr * g in w's dtype as -(lr * g) + w: the same bits, one new array less."""
    step = np.multiply(g, -w.dtype.type(learning_rate))
    return np.add(step, w, out=step)
