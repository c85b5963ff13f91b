import numpy as np
import pytest

from fcp_server.aggregation import optimizers
from fcp_server.aggregation.state import Tensor
from fcp_server.protos import plan_pb2, task_builder_pb2

Optimizer = task_builder_pb2.Optimizer


def _weights_and_grads(
    rng: np.random.Generator, steps: int
) -> tuple[list[Tensor], list[list[Tensor]]]:
    weights = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)]
    grads = [[rng.normal(size=w.shape).astype(np.float32) for w in weights] for _ in range(steps)]
    return weights, grads


def test_sgd_subtracts_the_scaled_update():
    sgd = optimizers.Sgd(learning_rate=0.5)
    state = sgd.initialize([np.zeros(2, np.float32)])
    assert state == {}
    new_state, (w,) = sgd.next(
        state, [np.array([1.0, 2.0], np.float32)], [np.array([2.0, -2.0], np.float32)]
    )
    assert new_state == {}
    np.testing.assert_allclose(w, [0.0, 3.0])
    assert w.dtype == np.float32


def test_momentum_accumulates_velocity():
    sgdm = optimizers.Sgd(learning_rate=0.1, momentum=0.9)
    w: tuple[Tensor, ...] = (np.array([1.0], np.float32),)
    state = sgdm.initialize(w)
    assert list(state) == ["accumulator/0"]
    g = [np.array([1.0], np.float32)]
    state, w = sgdm.next(state, w, g)
    state, w = sgdm.next(state, w, g)
    # v1 = 1, v2 = 0.9 + 1 = 1.9; w = 1 - 0.1 - 0.19.
    np.testing.assert_allclose(state["accumulator/0"], [1.9], rtol=1e-6)
    np.testing.assert_allclose(w[0], [0.71], rtol=1e-6)


def test_adam_first_step_matches_the_formula():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-7
    adam = optimizers.Adam(lr, b1, b2, eps)
    w0 = np.array([1.0, -1.0], np.float32)
    g = np.array([0.5, -2.0], np.float32)
    state, (w1,) = adam.next(adam.initialize([w0]), [w0], [g])
    a = (1 - b1) * g.astype(np.float64)
    s = (1 - b2) * np.square(g.astype(np.float64))
    expected = w0 - lr * np.sqrt(1 - b2) / (1 - b1) * a / (np.sqrt(s) + eps)
    np.testing.assert_allclose(w1, expected, rtol=1e-6)
    assert int(state["step"]) == 1
    assert state["step"].dtype == np.int64


def test_state_specs_name_the_checkpoint_tensors():
    model = plan_pb2.ModelSpec()
    model.trainable.add(shape=[3, 2], dtype="float32")
    model.trainable.add(shape=[2], dtype="float32")
    adam = plan_pb2.OptimizerSpec(type=Optimizer.ADAM, learning_rate=0.1, beta_1=0.9, beta_2=0.99)
    specs = optimizers.state_specs(adam, model)
    assert [(s.name, list(s.shape), s.dtype) for s in specs] == [
        ("server_optimizer/step", [], "int64"),
        ("server_optimizer/accumulator/0", [3, 2], "float32"),
        ("server_optimizer/preconditioner/0", [3, 2], "float32"),
        ("server_optimizer/accumulator/1", [2], "float32"),
        ("server_optimizer/preconditioner/1", [2], "float32"),
    ]
    sgd = plan_pb2.OptimizerSpec(type=Optimizer.SGD, learning_rate=1.0)
    assert optimizers.state_specs(sgd, model) == []
    sgdm = plan_pb2.OptimizerSpec(type=Optimizer.SGD, learning_rate=1.0, momentum=0.9)
    assert [s.name for s in optimizers.state_specs(sgdm, model)] == [
        "server_optimizer/accumulator/0",
        "server_optimizer/accumulator/1",
    ]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (plan_pb2.OptimizerSpec(type=Optimizer.UNKNOWN), "Unsupported server optimizer"),
        (plan_pb2.OptimizerSpec(type=Optimizer.SGD, learning_rate=-1), "learning_rate"),
        (plan_pb2.OptimizerSpec(type=Optimizer.SGD, learning_rate=1, momentum=1.5), "momentum"),
        (plan_pb2.OptimizerSpec(type=Optimizer.ADAM, learning_rate=1, beta_1=1.0), "beta_1"),
        (plan_pb2.OptimizerSpec(type=Optimizer.ADAM, learning_rate=1, beta_2=2.0), "beta_2"),
        (plan_pb2.OptimizerSpec(type=Optimizer.ADAM, learning_rate=1, epsilon=-1), "epsilon"),
    ],
)
def test_bad_specs_are_rejected(spec, match):
    with pytest.raises(ValueError, match=match):
        optimizers.build_server_optimizer(spec)


def test_mismatched_inputs_are_rejected():
    adam = optimizers.Adam(0.1)
    w = [np.zeros(2, np.float32)]
    with pytest.raises(ValueError, match="state has keys"):
        adam.next({}, w, w)
    with pytest.raises(ValueError, match="Update 0"):
        adam.next(adam.initialize(w), w, [np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="1 weights but 2"):
        optimizers.Sgd(1.0).next({}, w, [*w, *w])


@pytest.mark.tf
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgdm_equals_tff_build_sgdm(momentum):
    tf = pytest.importorskip("tensorflow")
    tff = pytest.importorskip("tensorflow_federated")
    weights, grads = _weights_and_grads(np.random.default_rng(0), steps=5)
    tff_opt = tff.learning.optimizers.build_sgdm(learning_rate=0.3, momentum=momentum or None)
    ours = optimizers.Sgd(learning_rate=0.3, momentum=momentum)
    tff_state = tff_opt.initialize([tf.TensorSpec(w.shape, tf.float32) for w in weights])
    tff_w = [tf.constant(w) for w in weights]
    state, w = ours.initialize(weights), tuple(weights)
    for g in grads:
        tff_state, tff_w = tff_opt.next(tff_state, tff_w, [tf.constant(x) for x in g])
        state, w = ours.next(state, w, g)
        for mine, theirs in zip(w, tff_w, strict=True):
            np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-6, atol=1e-7)
    if momentum:
        for i, acc in enumerate(tff_state["accumulator"]):
            np.testing.assert_allclose(state[f"accumulator/{i}"], acc.numpy(), rtol=1e-6)


@pytest.mark.tf
def test_adam_equals_tff_build_adam():
    tf = pytest.importorskip("tensorflow")
    tff = pytest.importorskip("tensorflow_federated")
    weights, grads = _weights_and_grads(np.random.default_rng(1), steps=6)
    tff_opt = tff.learning.optimizers.build_adam(
        learning_rate=0.05, beta_1=0.8, beta_2=0.99, epsilon=1e-3
    )
    ours = optimizers.Adam(learning_rate=0.05, beta_1=0.8, beta_2=0.99, epsilon=1e-3)
    tff_state = tff_opt.initialize([tf.TensorSpec(w.shape, tf.float32) for w in weights])
    tff_w = [tf.constant(w) for w in weights]
    state, w = ours.initialize(weights), tuple(weights)
    for g in grads:
        tff_state, tff_w = tff_opt.next(tff_state, tff_w, [tf.constant(x) for x in g])
        state, w = ours.next(state, w, g)
        for mine, theirs in zip(w, tff_w, strict=True):
            np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-6, atol=1e-7)
    assert int(state["step"]) == int(tff_state["step"]) == len(grads)
    for i in range(len(weights)):
        np.testing.assert_allclose(
            state[f"accumulator/{i}"], tff_state["accumulator"][i].numpy(), rtol=1e-6
        )
        np.testing.assert_allclose(
            state[f"preconditioner/{i}"], tff_state["preconditioner"][i].numpy(), rtol=1e-6
        )


def test_plain_sgd_is_bit_identical_to_w_minus_lr_g():
    rng = np.random.default_rng(11)
    weights = [rng.normal(size=(64, 33)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
    grads = [rng.normal(size=w.shape).astype(np.float32) for w in weights]
    opt = optimizers.build_server_optimizer(
        plan_pb2.OptimizerSpec(type=task_builder_pb2.Optimizer.SGD, learning_rate=0.37)
    )
    _, new = opt.next(opt.initialize(weights), weights, grads)
    for w, g, n in zip(weights, grads, new, strict=True):
        assert n.dtype == np.float32
        np.testing.assert_array_equal(n, w - np.float32(0.37) * g)
