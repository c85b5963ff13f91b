import dataclasses
import json

import numpy as np
import pytest

from fcp_server import checkpoints
from fcp_server.aggregation import optimizers
from fcp_server.aggregation.state import ClientUpdate, ModelWeights, ServerState, Tensor
from fcp_server.protos import plan_pb2, task_builder_pb2
from tests.unit.aggregation.plan_builders import (
    constant_update,
    make_plan,
    make_update,
    random_weights,
)

MAX = 1 << 20
Optimizer = task_builder_pb2.Optimizer


def _raw(header: object, payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + payload


def _update_tensors(update: ClientUpdate) -> dict[str, Tensor]:
    return checkpoints.decode_tensors(checkpoints.encode_update(update), max_bytes=MAX)[0]


def test_tensors_and_metadata_round_trip():
    tensors: dict[str, Tensor] = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array(7, np.int64),
    }
    data = checkpoints.encode_tensors(tensors, {"k": "v"})
    decoded, metadata = checkpoints.decode_tensors(data, max_bytes=MAX)
    assert metadata == {"k": "v"}
    for name, value in tensors.items():
        np.testing.assert_array_equal(decoded[name], value)
        assert decoded[name].dtype == value.dtype


def test_update_round_trip():
    plan = make_plan()
    update = constant_update(0.5, num_examples=12)
    decoded = checkpoints.decode_update(checkpoints.encode_update(update), plan, max_bytes=MAX)
    assert decoded.num_examples == 12
    for a, b in zip(decoded.trainable, update.trainable, strict=True):
        np.testing.assert_array_equal(a, b)
    assert set(decoded.metrics) == {"loss", "auc"}
    np.testing.assert_array_equal(decoded.metrics["auc"][2], update.metrics["auc"][2])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        ((10**9).to_bytes(8, "little") + b"{}", "header length"),
        ((4).to_bytes(8, "little") + b"{{{{", "not valid JSON"),
        (_raw([1, 2]), "not a JSON object"),
        (b"\x0d" + b"\0" * 7 + b'{"a":1,"a":2}', "duplicate"),
        (_raw({"__metadata__": {"k": 1}}), "__metadata__"),
        (_raw({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}), "dtype"),
        (_raw({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), "shape"),
        (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "size"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}), "offsets"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), "Malformed"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gap"),
        (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "cover"),
        (
            _raw(
                {
                    "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "overlap",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_blobs_are_rejected(data, match):
    # Each case breaks one header rule (see the match string).
    with pytest.raises(checkpoints.CheckpointError, match=match):
        checkpoints.decode_tensors(data, max_bytes=MAX)


def test_decoded_tensors_are_read_only_views_of_the_blob():
    data = checkpoints.encode_update(constant_update(0.25))
    update = checkpoints.decode_update(data, make_plan(), max_bytes=MAX)
    for t in update.trainable:
        # No copy: the array's memory is the blob's; bytes are immutable, so is the view.
        assert np.shares_memory(t, np.frombuffer(data, np.uint8))
        assert not t.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            t[...] = 0.0


def test_oversized_and_truncated_updates_are_invalid():
    data = checkpoints.encode_update(constant_update(0.1))
    with pytest.raises(checkpoints.InvalidUpdate, match="limit"):
        checkpoints.decode_update(data, make_plan(), max_bytes=len(data) - 1)
    with pytest.raises(checkpoints.InvalidUpdate):
        checkpoints.decode_update(data[:-3], make_plan(), max_bytes=MAX)
    assert issubclass(checkpoints.InvalidUpdate, ValueError)


def _mutated(name: str, value: Tensor | None = None, *, drop: bool = False) -> bytes:
    tensors = _update_tensors(constant_update(0.1))
    if drop:
        del tensors[name]
    elif value is not None:
        tensors[name] = value
    return checkpoints.encode_tensors(tensors)


# Each update breaks one rule of make_plan()'s update layout (see the match string).
_MISFIT_UPDATES = [
    (_mutated("trainable/1", drop=True), "Missing tensors: trainable/1"),
    (_mutated("metric/auc/3", drop=True), "metric/auc/3"),
    (_mutated("extra", np.zeros(1, np.float32)), "Unexpected tensors: extra"),
    (_mutated("trainable/0", np.zeros((2, 3), np.float32)), "'trainable/0' is float32"),
    (_mutated("trainable/1", np.zeros(2, np.float64)), "'trainable/1' is float64"),
    (_mutated("trainable/1", np.array([0.0, np.nan], np.float32)), "'trainable/1' has NaN"),
    (_mutated("trainable/0", np.full((3, 2), np.inf, np.float32)), "'trainable/0' has NaN"),
    (_mutated("metric/loss/0", np.array(np.nan, np.float32)), "'metric/loss/0' has NaN"),
    (_mutated("metric/auc/1", np.zeros(4, np.float32)), "'metric/auc/1'"),
    (_mutated("num_examples", np.array(5, np.int32)), "'num_examples' is int32"),
    (_mutated("num_examples", np.array([5], np.int64)), "'num_examples'"),
    (_mutated("num_examples", np.array(-1, np.int64)), "'num_examples' is -1"),
    (_mutated("num_examples", np.array(10**9, np.int64)), "'num_examples' is 1000000000"),
]


@pytest.mark.parametrize(
    ("data", "match"), _MISFIT_UPDATES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_updates_that_do_not_fit_the_plan_are_rejected_naming_the_tensor(data, match):
    with pytest.raises(checkpoints.InvalidUpdate, match=match):
        checkpoints.decode_update(data, make_plan(), max_bytes=MAX, max_num_examples=10**6)


@pytest.mark.parametrize(
    ("data", "match"), _MISFIT_UPDATES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_the_plans_update_layout_rejects_the_same_updates(data, match):
    layout = checkpoints.update_layout(make_plan())
    with pytest.raises(checkpoints.InvalidUpdate, match=match):
        checkpoints.decode_update(data, layout, max_bytes=MAX, max_num_examples=10**6)


@pytest.mark.parametrize("kind", [plan_pb2.PlanKind.TRAINING, plan_pb2.PlanKind.EVALUATION])
def test_an_update_layout_decodes_as_its_plan_does(kind):
    plan = make_plan()
    plan.kind = kind
    update = constant_update(0.5, num_examples=12)
    if kind == plan_pb2.PlanKind.EVALUATION:  # evaluation devices report metrics only
        update = dataclasses.replace(update, trainable=())
    data = checkpoints.encode_update(update)
    by_plan = checkpoints.decode_update(data, plan, max_bytes=MAX)
    by_layout = checkpoints.decode_update(data, checkpoints.update_layout(plan), max_bytes=MAX)
    assert by_layout.num_examples == by_plan.num_examples == 12
    assert by_layout.sum_of_squares == by_plan.sum_of_squares
    assert len(by_layout.trainable) == len(by_plan.trainable) == len(update.trainable)
    for a, b in zip(by_layout.trainable, by_plan.trainable, strict=True):
        np.testing.assert_array_equal(a, b)
    assert by_layout.metrics.keys() == by_plan.metrics.keys() == {"loss", "auc"}
    for name, state in by_plan.metrics.items():
        for a, b in zip(by_layout.metrics[name], state, strict=True):
            np.testing.assert_array_equal(a, b)


def test_an_evaluation_layout_refuses_a_model_delta():
    plan = make_plan()
    plan.kind = plan_pb2.PlanKind.EVALUATION
    data = checkpoints.encode_update(constant_update(0.5))
    with pytest.raises(checkpoints.InvalidUpdate, match="Unexpected tensors: trainable/0"):
        checkpoints.decode_update(data, checkpoints.update_layout(plan), max_bytes=MAX)


def test_an_update_layout_cannot_be_changed():
    layout = checkpoints.update_layout(make_plan())
    with pytest.raises(TypeError):
        layout.specs["extra"] = ((), np.dtype(np.float32))  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.trainable = ()  # type: ignore[misc]


def test_a_plan_with_an_unsupported_dtype_has_no_update_layout():
    plan = make_plan()
    plan.model.trainable[0].dtype = "complex64"
    with pytest.raises(ValueError, match="unsupported dtype"):
        checkpoints.update_layout(plan)


def test_a_plan_with_an_unknown_dtype_is_a_plan_error():
    plan = make_plan()
    plan.model.trainable[0].dtype = "complex64"
    with pytest.raises(ValueError, match="unsupported dtype 'complex64'"):
        checkpoints.decode_update(
            checkpoints.encode_update(constant_update(0.1)), plan, max_bytes=MAX
        )


def _server_state(
    plan: plan_pb2.ServerPlan, rng: np.random.Generator, round_num: int = 4
) -> ServerState:
    weights = random_weights(rng)
    opt = optimizers.build_server_optimizer(plan.server_optimizer)
    state = opt.initialize(weights.trainable)
    state = {k: v + 1 if k != "step" else v + 3 for k, v in state.items()}
    return ServerState(weights, state, {}, round_num, {"task": "t1", "eps": 0.5})


@pytest.mark.parametrize(
    ("optimizer", "momentum"), [(Optimizer.SGD, 0.0), (Optimizer.SGD, 0.9), (Optimizer.ADAM, 0.0)]
)
def test_server_checkpoint_round_trip(optimizer, momentum):
    plan = make_plan(optimizer=optimizer, momentum=momentum)
    state = _server_state(plan, np.random.default_rng(0))
    data = checkpoints.encode_server_checkpoint(state)
    decoded = checkpoints.decode_server_checkpoint(data, plan)
    assert decoded.round_num == 4
    assert decoded.metadata == {"task": "t1", "eps": 0.5}
    assert set(decoded.optimizer_state) == set(state.optimizer_state)
    for key, value in state.optimizer_state.items():
        np.testing.assert_array_equal(decoded.optimizer_state[key], value)
    for a, b in zip(decoded.weights.trainable, state.weights.trainable, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(decoded.weights.non_trainable[0], state.weights.non_trainable[0])


def test_aggregator_state_round_trips():
    plan = make_plan()
    state = _server_state(plan, np.random.default_rng(0))
    state = ServerState(state.weights, state.optimizer_state, {"clip": np.array(0.3)}, 1)
    decoded = checkpoints.decode_server_checkpoint(
        checkpoints.encode_server_checkpoint(state), plan
    )
    assert float(decoded.aggregator_state["clip"]) == pytest.approx(0.3)


def test_server_checkpoint_must_match_the_plan():
    adam = make_plan(optimizer=Optimizer.ADAM)
    data = checkpoints.encode_server_checkpoint(
        _server_state(make_plan(), np.random.default_rng(0))
    )
    with pytest.raises(checkpoints.CheckpointError, match="Missing tensors: server_optimizer"):
        checkpoints.decode_server_checkpoint(data, adam)
    client = checkpoints.encode_client_checkpoint(random_weights(np.random.default_rng(0)))
    with pytest.raises(checkpoints.CheckpointError, match="not a server checkpoint"):
        checkpoints.decode_server_checkpoint(client, make_plan())
    bad_meta = checkpoints.encode_tensors({}, {"fcp_kind": "server_checkpoint", "fcp_state": "[]"})
    with pytest.raises(checkpoints.CheckpointError, match="metadata"):
        checkpoints.decode_server_checkpoint(bad_meta, make_plan())


def test_plan_optimizer_state_specs_must_agree_with_the_optimizer():
    plan = make_plan(optimizer=Optimizer.ADAM)
    plan.server_optimizer_state.extend(optimizers.state_specs(plan.server_optimizer, plan.model))
    state = _server_state(plan, np.random.default_rng(0))
    checkpoints.decode_server_checkpoint(checkpoints.encode_server_checkpoint(state), plan)
    plan.server_optimizer_state[0].name = "server_optimizer/t"
    with pytest.raises(ValueError, match="server_optimizer_state does not match"):
        checkpoints.decode_server_checkpoint(checkpoints.encode_server_checkpoint(state), plan)


def test_client_checkpoint_round_trip_and_strictness():
    weights = random_weights(np.random.default_rng(2))
    data = checkpoints.encode_client_checkpoint(weights)
    decoded = checkpoints.decode_client_checkpoint(data, make_plan())
    np.testing.assert_array_equal(decoded.trainable[0], weights.trainable[0])
    extra = ModelWeights(weights.trainable, (*weights.non_trainable, np.zeros(1, np.float32)))
    with pytest.raises(checkpoints.CheckpointError, match="Unexpected tensors: non_trainable/1"):
        checkpoints.decode_client_checkpoint(
            checkpoints.encode_client_checkpoint(extra), make_plan()
        )


def test_initial_state_from_a_weights_only_checkpoint_has_zero_optimizer_state():
    plan = make_plan(optimizer=Optimizer.ADAM)
    weights = random_weights(np.random.default_rng(3))
    state = checkpoints.initial_server_state(plan, checkpoints.encode_client_checkpoint(weights))
    assert state.round_num == 0
    assert int(state.optimizer_state["step"]) == 0
    assert not state.optimizer_state["accumulator/0"].any()
    np.testing.assert_array_equal(state.weights.trainable[1], weights.trainable[1])


def test_initial_state_keeps_a_complete_optimizer_state_and_refuses_a_partial_one():
    plan = make_plan(optimizer=Optimizer.ADAM)
    full = _server_state(plan, np.random.default_rng(4))
    state = checkpoints.initial_server_state(plan, checkpoints.encode_server_checkpoint(full))
    assert int(state.optimizer_state["step"]) == 3
    assert state.round_num == 0
    partial = dict(full.optimizer_state)
    del partial["preconditioner/1"]
    broken = ServerState(full.weights, partial, {}, 0)
    with pytest.raises(checkpoints.CheckpointError, match="preconditioner/1"):
        checkpoints.initial_server_state(plan, checkpoints.encode_server_checkpoint(broken))


def test_evaluation_updates_carry_no_model_delta():
    plan = make_plan()
    plan.kind = plan_pb2.PlanKind.EVALUATION
    report = make_update((), num_examples=3)
    decoded = checkpoints.decode_update(checkpoints.encode_update(report), plan, max_bytes=MAX)
    assert decoded.trainable == ()
    assert decoded.num_examples == 3
    with pytest.raises(checkpoints.InvalidUpdate, match="Unexpected tensors: trainable/0"):
        checkpoints.decode_update(
            checkpoints.encode_update(constant_update(0.1)), plan, max_bytes=MAX
        )
