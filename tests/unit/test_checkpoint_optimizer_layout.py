"""A plan may list its server optimizer state in any order: tensors are addressed by name.

Regression: the task builder lists Adam's state in TFF's layout (step, every accumulator, every
preconditioner) while `optimizers.state_specs` interleaves them per weight; the server refused
every builder-made Adam task's initial checkpoint until the check compared names, not order.
"""

import numpy as np
import pytest

from fcp_server import checkpoints
from fcp_server.aggregation import optimizers
from tests.unit.aggregation.plan_builders import OptimizerType, make_plan


def _tff_layout_plan():
    plan = make_plan(optimizer=OptimizerType.ADAM)
    specs = {s.name: s for s in optimizers.state_specs(plan.server_optimizer, plan.model)}
    n = len(plan.model.trainable)
    names = [
        "server_optimizer/step",
        *(f"server_optimizer/accumulator/{i}" for i in range(n)),
        *(f"server_optimizer/preconditioner/{i}" for i in range(n)),
    ]
    plan.server_optimizer_state.extend(specs[name] for name in names)
    return plan


def _initial_checkpoint(plan) -> bytes:
    tensors = {
        f"trainable/{i}": np.zeros(tuple(t.shape), np.float32)
        for i, t in enumerate(plan.model.trainable)
    }
    tensors.update(
        {
            f"non_trainable/{i}": np.zeros(tuple(t.shape), np.float32)
            for i, t in enumerate(plan.model.non_trainable)
        }
    )
    for spec in plan.server_optimizer_state:
        tensors[spec.name] = np.zeros(tuple(spec.shape), np.dtype(spec.dtype))
    return checkpoints.encode_tensors(tensors, {})


def test_builder_ordered_adam_state_is_accepted():
    # Arrange: Adam state listed as the builder (and TFF) lay it out.
    plan = _tff_layout_plan()
    # Act
    state = checkpoints.initial_server_state(plan, _initial_checkpoint(plan))
    again = checkpoints.decode_server_checkpoint(checkpoints.encode_server_checkpoint(state), plan)
    # Assert
    assert int(again.optimizer_state["step"]) == 0
    assert set(again.optimizer_state) == {
        s.name.removeprefix("server_optimizer/") for s in plan.server_optimizer_state
    }


def test_a_missing_state_tensor_is_still_refused_in_any_order():
    plan = _tff_layout_plan()
    del plan.server_optimizer_state[-1]
    with pytest.raises(ValueError, match="server_optimizer_state does not match"):
        checkpoints.initial_server_state(plan, _initial_checkpoint(plan))
