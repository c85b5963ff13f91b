"""Device metric state is bounded before it is summed: one hostile device moves a finalized
metric at most as far as one bounded state can.

Each device's state element is clamped to [lower, bound] with bound = min(max_state_per_example
x num_examples, MAX_STATE_PER_DEVICE) (a RATIO numerator's lower is -bound, else 0). A ratio
or sum finalizer is monotone in each state element, so the values one bounded device can
produce lie between the finalizer's values at the corners of that box; the published metric
must lie there, and equal the value of the clamped state exactly.
"""

import itertools
import json

import numpy as np
import pytest

from fcp_server import checkpoints
from fcp_server.aggregation import ClientUpdate
from fcp_server.aggregation.metrics import MAX_STATE_PER_DEVICE
from fcp_server.protos import plan_pb2
from fcp_server.services import blob_paths
from tests.integration.server import testkit
from tests.integration.server.testkit import POP

Finalizer = plan_pb2.MetricSpec.Finalizer
F32_MAX = float(np.finfo(np.float32).max)
GOAL = 3
# name -> (finalizer, state elements, max_state_per_example)
METRICS = {
    "loss": (Finalizer.RATIO, 2, 0.0),  # a loss: no per-example bound, only the ceiling
    "accuracy": (Finalizer.RATIO, 2, 1.0),
    "errors": (Finalizer.SUM, 1, 0.0),
    "precision": (Finalizer.PRECISION, 2, 1.0),
}
HONEST = [
    {"loss": [4.0, 10.0], "accuracy": [7.0, 10.0], "errors": [3.0], "precision": [6.0, 1.0]},
    {"loss": [9.0, 20.0], "accuracy": [11.0, 20.0], "errors": [9.0], "precision": [8.0, 4.0]},
]
HONEST_EXAMPLES = [10, 20]
HOSTILE_EXAMPLES = 10_000_000  # the most an upload may claim


def _plan(kind=plan_pb2.PlanKind.TRAINING) -> plan_pb2.ServerPlan:
    plan = testkit.server_plan(report_goal=GOAL, kind=kind)
    del plan.metrics[:]
    for name, (finalizer, size, per_example) in METRICS.items():
        spec = plan.metrics.add(name=name, finalizer=finalizer, max_state_per_example=per_example)
        for k in range(size):
            spec.state.add(name=f"metric/{name}/{k}", shape=[], dtype="float32")
    return plan


def _update(states: dict[str, list[float]], num_examples: int, trainable: bool) -> bytes:
    tensors = ()
    if trainable:
        tensors = (
            np.full(testkit.W_SHAPE, 0.1, np.float32),
            np.full(testkit.B_SHAPE, 0.1, np.float32),
        )
    metrics = {
        name: tuple(np.float32(v).reshape(()) for v in values) for name, values in states.items()
    }
    return checkpoints.encode_update(
        ClientUpdate(trainable=tensors, num_examples=num_examples, metrics=metrics)
    )


def _finalize(finalizer: int, state: np.ndarray) -> float:
    if finalizer == Finalizer.SUM:
        return float(state[0])
    if finalizer == Finalizer.PRECISION:
        return float(state[0] / (state[0] + state[1]))
    return float(state[0] / state[1])


def _box(name: str, num_examples: int) -> list[tuple[float, float]]:
    finalizer, size, per_example = METRICS[name]
    bound = MAX_STATE_PER_DEVICE
    if per_example > 0:
        bound = min(bound, per_example * num_examples)
    lows = [-bound if finalizer == Finalizer.RATIO and k == 0 else 0.0 for k in range(size)]
    return [(low, bound) for low in lows]


HOSTILE = {
    "huge": {"loss": [F32_MAX, 1.0], "accuracy": [1e9, 0.0], "errors": [F32_MAX],
             "precision": [1e12, 0.0]},
    "negative": {"loss": [-F32_MAX, 0.0], "accuracy": [-1e9, 1e9], "errors": [-F32_MAX],
                 "precision": [0.0, 1e12]},
}  # fmt: skip


def _contributions(hostile):
    return [*zip(HONEST, HONEST_EXAMPLES, strict=True), (hostile, HOSTILE_EXAMPLES)]


@pytest.mark.parametrize("attack", list(HOSTILE))
def test_a_hostile_metric_state_moves_a_metric_at_most_one_bounded_share(api, ctx, worker, attack):
    hostile = HOSTILE[attack]
    api.open_training(testkit.training_task(report_goal=GOAL), plan=_plan())
    for states, n in _contributions(hostile):
        api.contribute(_update(states, n, trainable=True))
    assert worker.tick().rounds_closed == 1
    published = json.loads(ctx.blobs.get(blob_paths.metrics_blob(POP, 1, 1)))

    for name, (finalizer, _, _) in METRICS.items():
        value = published[f"server/client_work/train/{name}"]
        honest = np.sum([h[name] for h in HONEST], axis=0, dtype=np.float64)
        box = _box(name, HOSTILE_EXAMPLES)
        corners = [_finalize(finalizer, honest + np.array(c)) for c in itertools.product(*box)]
        assert min(corners) - 1e-9 <= value <= max(corners) + 1e-9, (name, value, corners)
        clamped = np.clip(np.array(hostile[name]), [lo for lo, _ in box], [hi for _, hi in box])
        assert value == pytest.approx(_finalize(finalizer, honest + clamped), rel=1e-6), name
    # The example count is bounded the same way.
    examples = published["server/client_work/train/num_examples"]
    assert examples == sum(HONEST_EXAMPLES) + MAX_STATE_PER_DEVICE


def test_eval_rounds_bound_metric_state_too(api, ctx, worker):
    evaluation = plan_pb2.PlanKind.EVALUATION
    created = api.created(
        testkit.training_task(report_goal=GOAL), testkit.eval_task(report_goal=GOAL)
    )
    api.upload_artifacts(created.task, _plan(), testkit.client_plan(), testkit.initial_checkpoint())
    api.upload_artifacts(
        created.eval_task, _plan(evaluation), testkit.client_plan(evaluation), None
    )
    for task_id in (1, 2):
        assert api.task_call(POP, task_id, "open").status_code == 200
    for _ in range(GOAL):  # one training round, so there is a model to evaluate
        api.contribute_to(1, _update(HONEST[0], 10, trainable=True))
    assert worker.tick().rounds_closed == 1
    for states, n in _contributions(HOSTILE["huge"]):
        api.contribute_to(2, _update(states, n, trainable=False))
    assert worker.tick().rounds_closed == 1

    published = json.loads(ctx.blobs.get(blob_paths.metrics_blob(POP, 2, 1)))
    loss = published["server/client_work/eval/loss"]
    honest = np.sum([h["loss"] for h in HONEST], axis=0)
    assert loss == pytest.approx((honest[0] + MAX_STATE_PER_DEVICE) / (honest[1] + 1.0))
    assert published["server/client_work/eval/errors"] == 12.0 + MAX_STATE_PER_DEVICE
