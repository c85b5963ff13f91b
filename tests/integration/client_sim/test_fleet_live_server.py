"""The `client-sim` fleet trains and evaluates the digits task on a live gunicorn server."""

import json

import httpx
import pytest

from client_sim import cli
from tests.integration.client_sim.conftest import make_config, register_tasks

pytestmark = [pytest.mark.tf, pytest.mark.slow]


def _blob(tmp_path, name):
    from fcp_server.storage.blobs import make_blob_store

    return make_blob_store((tmp_path / "blobs").as_uri()).get(name, max_bytes=64 << 20)


def test_fleet_trains_and_evaluates_over_several_rounds(
    live_server, digits_plans, tmp_path, capsys
):
    # Arrange: the builder's digits training + eval tasks, registered on the live server.
    config = make_config(population="digits_live", rounds=3)
    with httpx.Client(base_url=live_server, timeout=30) as http:
        train_task, eval_task = register_tasks(http, config, digits_plans)
    # Act: the CLI, with its default (real-fleet) failure knobs and a TFLite worker process.
    code = cli.main(
        [
            "--server",
            live_server,
            "--population",
            "digits_live",
            "--devices",
            "16",
            "--rounds",
            "3",
            "--eval-rounds",
            "1",
            "--seed",
            "7",
            "--compute-workers",
            "1",
            "--concurrency",
            "6",
            "--compute-median",
            "1",
            "--checkin-interval",
            "30",
            "--max-duration",
            "400",
            "--quiet",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    # Assert: the goal was reached and every round left its checkpoint and metrics.
    assert code == 0, summary
    assert summary["stop_reason"] == "goal reached"
    assert summary["counts"]["uploads"] >= 3 * 4
    pop, tid = "digits_live", train_task.task_id
    losses = []
    for n in (1, 2, 3):
        assert _blob(tmp_path, f"{pop}/{tid}/{n}/s/0/checkpoint")
        metrics = json.loads(_blob(tmp_path, f"{pop}/{tid}/{n}/s/0/metrics"))
        losses.append(metrics["server/client_work/train/loss"])
    assert losses[2] < losses[0], losses
    eval_metrics = json.loads(_blob(tmp_path, f"{pop}/{eval_task.task_id}/1/s/0/metrics"))
    assert 0 < eval_metrics["server/client_work/eval/loss"] < 5
    assert 0 <= eval_metrics["server/client_work/eval/sparse_categorical_accuracy"] <= 1
