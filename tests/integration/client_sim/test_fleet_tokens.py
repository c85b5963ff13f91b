"""A fleet against a server that requires device tokens: one token per device.

With device auth on, the server lets each token contribute once per round, so a fleet must
give its devices their own tokens (`fcp-server tokens issue --count N`, `client-sim
--auth-tokens-file`); with one shared token a round of report goal 4 could never fill.
"""

import dataclasses
import subprocess
import sys

import httpx
import pytest

from client_sim import cli, rounds
from client_sim.fleet import Fleet
from tests.integration.client_sim.conftest import (
    make_config,
    register_tasks,
    server_settings,
    version_mix_latest,
)
from tests.integration.client_sim.test_fleet_inprocess import BASE, _devices, _knobs

pytestmark = [pytest.mark.tf, pytest.mark.slow]
DEVICES = 8


def test_per_device_tokens_let_a_fleet_fill_rounds_under_device_auth(tmp_path, digits_plans):
    from fcp_server.app import create_app

    settings = server_settings(tmp_path, device_auth="true")
    app = create_app(settings)
    try:
        issued = subprocess.run(
            [
                *(sys.executable, "-m", "fcp_server.cli", "--database-url"),
                *(settings.database_url, "tokens", "issue", "--count", str(DEVICES)),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        assert len(set(issued)) == DEVICES
        token_file = tmp_path / "tokens.txt"
        token_file.write_text("\n".join(issued) + "\n")
        args = cli.build_parser().parse_args(
            [
                *("--server", BASE, "--population", "digits_cnn", "--rounds", "2"),
                *("--auth-tokens-file", str(token_file), "--compute-workers", "0"),
                *("--dropout", "0", "--crash-after-report", "0", "--network-errors", "0"),
                *("--duplicate-uploads", "0", "--stragglers", "0", "--compute-median", "1"),
            ]
        )
        config = cli._config(args)
        assert config.auth_tokens == tuple(issued)

        transport = httpx.WSGITransport(app=app)
        http = httpx.Client(transport=transport, base_url=BASE)
        task_config = make_config(report_goal=4, rounds=2)
        register_tasks(http, task_config, digits_plans, with_eval=False)
        knobs = _knobs(checkin_interval=30.0)
        fleet = Fleet(
            _devices(DEVICES, partition="iid")[: DEVICES - 2],
            dataclasses.replace(config, knobs=knobs, concurrency=6, versions=version_mix_latest()),
            transport=transport,
            base_url=BASE,
        )
        goal = rounds.RoundGoal(2)
        summary = fleet.run(
            until=lambda: goal.reached(rounds.list_tasks(http, task_config.population_name)),
            duration=180.0,
            poll_interval=0.3,
        )
    finally:
        worker = app.extensions.get("fcp_worker")
        if worker is not None:
            thread, stop = worker
            stop.set()
            thread.join(timeout=30)

    assert summary["stop_reason"] == "goal reached", summary
    used = {device.api._token for device in fleet.devices}
    assert used == set(issued[: DEVICES - 2])
