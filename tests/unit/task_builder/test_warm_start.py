# Fixtures are imported from saved_examples, so pytest's argument injection reads as F811.
# ruff: noqa: F811
import numpy as np
import pytest

pytest.importorskip("tensorflow_federated")

import safetensors.numpy

from fcp_server import checkpoints
from fcp_server.aggregation.state import ModelWeights, ServerState
from fcp_server.services import blob_paths
from task_builder import model_versions, plans
from task_builder.model_versions import ModelVersionError
from tests.unit.task_builder.saved_examples import (  # noqa: F401
    digits_model,
    make_config,
    saved_dir,
)

pytestmark = pytest.mark.tf

POP, SOURCE_TASK = "digits", 1


def _trained(model, rng) -> ModelWeights:
    trainable, non_trainable = model.initial_weights
    return ModelWeights(
        trainable=tuple(
            (np.asarray(w) + rng.normal(size=np.shape(w))).astype(np.float32) for w in trainable
        ),
        non_trainable=tuple(np.asarray(w) for w in non_trainable),
    )


def _build(model, **kwargs):
    # Server momentum, so the checkpoint has optimizer state that must start fresh.
    config = make_config(mode="TRAINING_ONLY", server_momentum=0.9)
    return plans.build_plans(
        model, config, skip_dp_aggregator=False, skip_flex_ops_check=True, **kwargs
    )


@pytest.fixture(scope="module")
def round_weights(digits_model, tmp_path_factory):
    """A source task whose server stored rounds 0..3; returns (store, weights by round)."""
    from fcp_server.storage import blobs

    store = blobs.make_blob_store(tmp_path_factory.mktemp("blobs").as_uri())
    rng = np.random.default_rng(21)
    by_round = {n: _trained(digits_model, rng) for n in range(4)}
    for n, w in by_round.items():
        opt = {"momentum/0": np.ones_like(w.trainable[0])}  # deliberately non-zero
        state = ServerState(w, opt, {}, n, {})
        store.put(
            blob_paths.server_checkpoint_blob(POP, SOURCE_TASK, n),
            checkpoints.encode_server_checkpoint(state),
        )
    yield store, by_round
    store.close()


def test_warm_start_checkpoint_carries_the_chosen_round(digits_model, round_weights):
    store, by_round = round_weights
    spec = plans.build_model_spec(digits_model)
    version, weights = model_versions.load_version_weights(
        store, POP, SOURCE_TASK, spec, round_num=2
    )
    assert version.round == 2 and version.client_checkpoint is None

    train = _build(digits_model, initial_weights=weights).training

    assert train is not None and train.initial_checkpoint is not None
    tensors = safetensors.numpy.load(train.initial_checkpoint)
    for i, w in enumerate(by_round[2].trainable):
        np.testing.assert_array_equal(tensors[f"trainable/{i}"], w)
    cold = safetensors.numpy.load(_build(digits_model).training.initial_checkpoint)
    assert not np.array_equal(tensors["trainable/0"], cold["trainable/0"])
    # Only weights carry over: the new task's server optimizer state is zero.
    opt = {k: v for k, v in tensors.items() if k.startswith("server_optimizer/")}
    assert opt and all(not v.any() for v in opt.values())
    assert set(tensors) == set(cold)
    # The server reads it as round 0 of the new task, starting from the warm weights.
    state = checkpoints.initial_server_state(train.server_plan, train.initial_checkpoint)
    assert state.round_num == 0
    np.testing.assert_array_equal(state.weights.trainable[-1], by_round[2].trainable[-1])


def test_warm_start_weights_must_fit_the_model(digits_model):
    weights = _trained(digits_model, np.random.default_rng(22))
    wrong_dtype = ModelWeights(
        (weights.trainable[0].astype(np.float64), *weights.trainable[1:]), ()
    )
    with pytest.raises(ModelVersionError, match=r"'trainable/0' is float64\[3, 3, 1, 8\]"):
        _build(digits_model, initial_weights=wrong_dtype)
    with pytest.raises(ModelVersionError, match="trainable tensors, the model has"):
        _build(digits_model, initial_weights=ModelWeights(weights.trainable[:-1], ()))
