"""`fcp-models` run in-process against a real file:// blob store in the server's layout."""

import numpy as np
import pytest

from fcp_server import checkpoints
from fcp_server.aggregation.state import ModelWeights, ServerState
from fcp_server.services import blob_paths
from fcp_server.storage import blobs
from task_builder import export_cli

POP, TASK = "digits", 5


@pytest.fixture
def store_url(tmp_path):
    return (tmp_path / "blobs").as_uri()


def _put_round(url, round_num, weights, *, server_only=False):
    store = blobs.make_blob_store(url)
    try:
        state = ServerState(weights, {}, {}, round_num, {})
        store.put(
            blob_paths.server_checkpoint_blob(POP, TASK, round_num),
            checkpoints.encode_server_checkpoint(state),
        )
        if not server_only:
            store.put(
                blob_paths.client_checkpoint_blob(POP, TASK, round_num),
                checkpoints.encode_client_checkpoint(weights),
            )
            if round_num:
                store.put(blob_paths.metrics_blob(POP, TASK, round_num), b"{}")
    finally:
        store.close()


def _tiny_weights(seed):
    return ModelWeights((np.random.default_rng(seed).normal(size=3).astype(np.float32),), ())


def _task_flags(url):
    return ["--blob_url", url, "--population", POP, "--task", str(TASK)]


def test_list_prints_one_row_per_round(store_url, capsys):
    for n in (0, 1, 12):
        _put_round(store_url, n, _tiny_weights(n))
    _put_round(store_url, 2, _tiny_weights(2), server_only=True)

    assert export_cli.main(["list", *_task_flags(store_url)]) == 0

    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["round", "checkpoint", "client_checkpoint", "metrics"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "12"]
    assert rows[1] == [
        "0",
        f"{POP}/{TASK}/0/s/0/checkpoint",
        f"{POP}/{TASK}/0/d/0/client_checkpoint",
        "-",
    ]
    assert rows[3][2:] == ["-", "-"]
    assert rows[4][3] == f"{POP}/{TASK}/12/s/0/metrics"


def test_list_of_an_unknown_task_fails(store_url, capsys):
    assert export_cli.main(["list", *_task_flags(store_url)]) == 1
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["list", "--blob_url", "file:///x", "--population", "p", "--task", "zero"],
        ["list", "--blob_url", "file:///x", "--population", "p", "--task", "0"],
        ["export", "--blob_url", "file:///x", "--population", "p", "--task", "1"],
        ["show"],
    ],
)
def test_bad_flags_exit_with_2(argv):
    with pytest.raises(SystemExit) as e:
        export_cli.main(argv)
    assert e.value.code == 2


def test_bad_blob_url_and_population_exit_with_1(capsys):
    assert (
        export_cli.main(["list", "--blob_url", "s3://b", "--population", "p", "--task", "1"]) == 1
    )
    assert "unsupported scheme" in capsys.readouterr().err
    assert (
        export_cli.main(["list", "--blob_url", "file:///tmp", "--population", "a/b", "--task", "1"])
        == 1
    )
    assert "invalid population" in capsys.readouterr().err


@pytest.fixture(scope="module")
def digits_saved(tmp_path_factory):
    pytest.importorskip("tensorflow_federated")
    from task_builder.examples import save_models

    return save_models.save_example("digits_cnn", tmp_path_factory.mktemp("models"))


@pytest.mark.tf
def test_export_writes_the_chosen_round(digits_saved, store_url, tmp_path, capsys):
    from task_builder import export, model_loading

    model = model_loading.load_model(str(digits_saved))
    rng = np.random.default_rng(31)
    trainable, _ = model.initial_weights
    by_round = {
        n: ModelWeights(
            tuple(
                (np.asarray(w) + rng.normal(size=np.shape(w))).astype(np.float32) for w in trainable
            ),
            (),
        )
        for n in (0, 1, 2)
    }
    for n, w in by_round.items():
        _put_round(store_url, n, w)
    x = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)

    def exported_predictions(out):
        return export.predict_saved_model(out / export.SAVED_MODEL_DIR, x)

    def expected(n):
        weights = by_round[n]
        return np.asarray(model.predict_on_batch((weights.trainable, ()), x, False))

    base = ["export", "--saved_model", str(digits_saved), *_task_flags(store_url)]
    assert export_cli.main([*base, "--out", str(tmp_path / "latest")]) == 0
    assert "exported round 2" in capsys.readouterr().out
    np.testing.assert_allclose(exported_predictions(tmp_path / "latest"), expected(2), rtol=1e-5)
    assert (tmp_path / "latest" / export.TFLITE_FILE).stat().st_size > 0

    assert export_cli.main([*base, "--round", "1", "--out", str(tmp_path / "r1")]) == 0
    np.testing.assert_allclose(exported_predictions(tmp_path / "r1"), expected(1), rtol=1e-5)

    assert export_cli.main([*base, "--round", "1", "--out", str(tmp_path / "r1")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert export_cli.main([*base, "--round", "9", "--out", str(tmp_path / "r9")]) == 1
    assert "no checkpoint for round 9" in capsys.readouterr().err
    assert not (tmp_path / "r9").exists()


@pytest.mark.tf
def test_export_of_a_checkpoint_of_another_model_fails(digits_saved, store_url, tmp_path, capsys):
    _put_round(store_url, 0, _tiny_weights(0))
    argv = ["export", "--saved_model", str(digits_saved), *_task_flags(store_url)]
    assert export_cli.main([*argv, "--out", str(tmp_path / "o")]) == 1
    assert "lacks model tensor(s) trainable/1" in capsys.readouterr().err
