"""Model versions read from a real local blob store holding checkpoints in the server layout."""

import numpy as np
import pytest

from fcp_server import checkpoints
from fcp_server.aggregation.state import ModelWeights, ServerState
from fcp_server.protos import plan_pb2
from fcp_server.services import blob_paths
from task_builder import model_versions
from task_builder.model_versions import ModelVersion, ModelVersionError

POP, TASK = "digits", 3


def _spec() -> plan_pb2.ModelSpec:
    spec = plan_pb2.ModelSpec()
    spec.trainable.add(name="trainable/0", shape=[2, 3], dtype="float32")
    spec.trainable.add(name="trainable/1", shape=[3], dtype="float32")
    spec.non_trainable.add(name="non_trainable/0", shape=[], dtype="int64")
    return spec


def _weights(rng, scale=1.0) -> ModelWeights:
    return ModelWeights(
        trainable=(
            (scale * rng.normal(size=(2, 3))).astype(np.float32),
            (scale * rng.normal(size=3)).astype(np.float32),
        ),
        non_trainable=(np.array(int(rng.integers(0, 100)), dtype=np.int64),),
    )


def _server_ckpt(weights, round_num):
    momentum = {"momentum/0": np.ones((2, 3), np.float32)}
    return checkpoints.encode_server_checkpoint(ServerState(weights, momentum, {}, round_num, {}))


def _publish(store, round_num, weights, *, client=True, server=True, metrics=True):
    """Writes what the server writes when it closes a round (blob_paths layout)."""
    if server:
        store.put(blob_paths.server_checkpoint_blob(POP, TASK, round_num), _server_ckpt(weights, 1))
    if client:
        store.put(
            blob_paths.client_checkpoint_blob(POP, TASK, round_num),
            checkpoints.encode_client_checkpoint(weights),
        )
    if metrics:
        store.put(blob_paths.metrics_blob(POP, TASK, round_num), b'{"loss": 1.0}')


def _assert_weights_equal(got, want):
    for a, b in zip(
        got.trainable + got.non_trainable, want.trainable + want.non_trainable, strict=True
    ):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_versions_are_sorted_numerically_and_skip_other_blobs(blob_store):
    rng = np.random.default_rng(0)
    _publish(blob_store, 0, _weights(rng), metrics=False)
    for n in (10, 2, 1):
        _publish(blob_store, n, _weights(rng))
    blob_store.put(blob_paths.artifact_blob(POP, TASK, "server_phase"), b"plan")
    blob_store.put(
        blob_paths.gradient_blob(POP, TASK, 2, "0b7d5c55-8c3e-4a3e-9d36-0a1b2c3d4e5f"), b"u"
    )
    blob_store.put(blob_paths.metrics_blob(POP, TASK, 11), b"{}")  # no weights: not a version
    _publish(blob_store, 7, _weights(rng), server=False)  # evaluation-style: client only
    blob_store.put(blob_paths.client_checkpoint_blob(POP, 33, 4), b"other task")

    versions = model_versions.list_versions(blob_store, POP, TASK)

    assert [v.round for v in versions] == [0, 1, 2, 7, 10]
    assert versions[0] == ModelVersion(
        0,
        f"{POP}/{TASK}/0/s/0/checkpoint",
        f"{POP}/{TASK}/0/d/0/client_checkpoint",
        None,
    )
    assert versions[3].checkpoint is None and versions[3].metrics is not None
    assert model_versions.latest_version(blob_store, POP, TASK).round == 10


def test_empty_task_has_no_versions_and_no_latest(blob_store):
    assert model_versions.list_versions(blob_store, POP, TASK) == []
    with pytest.raises(ModelVersionError, match="no checkpoint"):
        model_versions.latest_version(blob_store, POP, TASK)


@pytest.mark.parametrize(
    ("population", "task_id"), [("../x", 1), ("", 1), ("a/b", 1), ("p", 0), ("p", True)]
)
def test_malformed_task_is_rejected(blob_store, population, task_id):
    with pytest.raises(ModelVersionError):
        model_versions.list_versions(blob_store, population, task_id)


def test_load_reads_the_chosen_round_and_defaults_to_latest(blob_store):
    rng = np.random.default_rng(1)
    by_round = {n: _weights(rng) for n in (0, 1, 2)}
    for n, w in by_round.items():
        _publish(blob_store, n, w)

    version, weights = model_versions.load_version_weights(blob_store, POP, TASK, _spec())
    assert version.round == 2
    _assert_weights_equal(weights, by_round[2])

    version, weights = model_versions.load_version_weights(
        blob_store, POP, TASK, _spec(), round_num=1
    )
    assert version.round == 1
    _assert_weights_equal(weights, by_round[1])


def test_load_falls_back_to_the_server_checkpoint(blob_store):
    want = _weights(np.random.default_rng(2))
    _publish(blob_store, 4, want, client=False)
    _, got = model_versions.load_version_weights(blob_store, POP, TASK, _spec(), round_num=4)
    _assert_weights_equal(got, want)


def test_missing_round_names_the_known_rounds(blob_store):
    _publish(blob_store, 1, _weights(np.random.default_rng(3)))
    with pytest.raises(ModelVersionError, match=r"no checkpoint for round 5 .*latest rounds: 1"):
        model_versions.load_version_weights(blob_store, POP, TASK, _spec(), round_num=5)
    with pytest.raises(ModelVersionError, match="round must be"):
        model_versions.load_version_weights(blob_store, POP, TASK, _spec(), round_num=-1)


def test_wrong_shape_names_the_tensor(blob_store):
    rng = np.random.default_rng(4)
    bad = ModelWeights(
        trainable=(rng.normal(size=(3, 2)).astype(np.float32), np.zeros(3, np.float32)),
        non_trainable=(np.array(1, np.int64),),
    )
    _publish(blob_store, 1, bad)
    with pytest.raises(
        ModelVersionError, match=r"'trainable/0' is float32\[3, 2\].*float32\[2, 3\]"
    ):
        model_versions.load_version_weights(blob_store, POP, TASK, _spec())


def test_wrong_dtype_extra_and_missing_tensors_are_named():
    rng = np.random.default_rng(5)
    good = _weights(rng)
    as_f64 = checkpoints.encode_tensors(
        {
            "trainable/0": good.trainable[0].astype(np.float64),
            "trainable/1": good.trainable[1],
            "non_trainable/0": good.non_trainable[0],
        }
    )
    with pytest.raises(ModelVersionError, match="'trainable/0' is float64"):
        model_versions.weights_from_checkpoint(as_f64, _spec())
    extra = checkpoints.encode_client_checkpoint(
        ModelWeights((*good.trainable, np.zeros(1, np.float32)), good.non_trainable)
    )
    with pytest.raises(ModelVersionError, match="trainable/2"):
        model_versions.weights_from_checkpoint(extra, _spec())
    missing = checkpoints.encode_tensors({"trainable/0": good.trainable[0]})
    with pytest.raises(ModelVersionError, match=r"lacks model tensor.*trainable/1"):
        model_versions.weights_from_checkpoint(missing, _spec())
    with pytest.raises(ModelVersionError, match="not readable"):
        model_versions.weights_from_checkpoint(b"not safetensors", _spec())


def test_server_checkpoint_state_is_ignored_but_non_finite_weights_are_not():
    rng = np.random.default_rng(6)
    w = _weights(rng)
    _assert_weights_equal(model_versions.weights_from_checkpoint(_server_ckpt(w, 3), _spec()), w)
    nan = ModelWeights((w.trainable[0], np.full(3, np.nan, np.float32)), w.non_trainable)
    with pytest.raises(ModelVersionError, match="'trainable/1' has NaN"):
        model_versions.check_weights(nan, _spec())


def test_check_weights_counts_tensors_per_group():
    w = _weights(np.random.default_rng(7))
    with pytest.raises(ModelVersionError, match="1 trainable tensors, the model has 2"):
        model_versions.check_weights(ModelWeights(w.trainable[:1], w.non_trainable), _spec())


def test_model_spec_comes_from_the_server_plan(blob_store):
    with pytest.raises(ModelVersionError, match="no server plan"):
        model_versions.load_model_spec(blob_store, POP, TASK)
    plan = plan_pb2.ServerPlan(model=_spec())
    blob_store.put(blob_paths.artifact_blob(POP, TASK, "server_phase"), plan.SerializeToString())
    assert model_versions.load_model_spec(blob_store, POP, TASK) == _spec()
    blob_store.put(blob_paths.artifact_blob(POP, TASK, "server_phase"), b"\xff\xff")
    with pytest.raises(ModelVersionError, match="does not parse"):
        model_versions.load_model_spec(blob_store, POP, TASK)


def test_warm_start_reads_through_a_blob_url(tmp_path):
    from fcp_server.storage import blobs

    url = (tmp_path / "store").as_uri()
    store = blobs.make_blob_store(url)
    want = _weights(np.random.default_rng(8))
    _publish(store, 3, want)
    store.close()

    version, got = model_versions.load_warm_start_weights(url, POP, TASK, _spec())

    assert version.round == 3
    _assert_weights_equal(got, want)
    with pytest.raises(ModelVersionError, match="cannot open the warm-start blob store"):
        model_versions.load_warm_start_weights("ftp://x", POP, TASK, _spec())
    with pytest.raises(ModelVersionError, match="round 4"):
        model_versions.load_warm_start_weights(url, POP, TASK, _spec(), round_num=4)
