"""Fleets against an in-process server (httpx WSGITransport): each knob does what it says."""

import json
import threading

import httpx
import numpy as np
import pytest

from client_sim import data_sources, partitioning, rounds
from client_sim.fleet import Fleet, FleetConfig, run_compute_job
from client_sim.knobs import DeviceKnobs, VersionMix
from tests.integration.client_sim.conftest import (
    make_config,
    register_tasks,
    server_settings,
    version_mix_latest,
)

pytestmark = [pytest.mark.tf, pytest.mark.slow]
BASE = "http://fcp.test"


@pytest.fixture
def app(tmp_path):
    from fcp_server.app import create_app

    flask_app = create_app(server_settings(tmp_path))
    yield flask_app
    worker = flask_app.extensions.get("fcp_worker")
    if worker is not None:
        thread, stop = worker
        stop.set()
        thread.join(timeout=30)


def _devices(n, seed=0, partition="iid"):
    rng = np.random.default_rng(seed)
    source = data_sources.load_digits_source(rng)
    spec = partitioning.parse_partition(partition)
    return data_sources.assign_devices(source, n, spec, rng, eval_device_fraction=0.25)


def _run(
    app,
    config,
    built,
    *,
    knobs,
    devices=16,
    rounds_goal=2,
    versions=None,
    compute=None,
    duration=240.0,
    with_eval=True,
):
    transport = httpx.WSGITransport(app=app)
    http = httpx.Client(transport=transport, base_url=BASE)
    register_tasks(http, config, built, with_eval=with_eval)
    fleet = Fleet(
        _devices(devices),
        FleetConfig(
            population=config.population_name,
            concurrency=6,
            compute_workers=0,
            time_scale=0.01,
            knobs=knobs,
            versions=versions or version_mix_latest(),
        ),
        transport=transport,
        base_url=BASE,
        compute=compute,
    )
    goal = rounds.RoundGoal(rounds_goal)
    summary = fleet.run(
        until=lambda: goal.reached(rounds.list_tasks(http, config.population_name)),
        duration=duration,
        poll_interval=0.3,
    )
    summary["tasks"] = rounds.progress(rounds.list_tasks(http, config.population_name))
    return summary, fleet


def _knobs(**kw):
    base = {
        "dropout_rate": 0.0,
        "crash_after_report_rate": 0.0,
        "network_error_rate": 0.0,
        "duplicate_upload_rate": 0.0,
        "compute_median": 1.0,
        "straggler_rate": 0.0,
        "checkin_interval": 30.0,
    }
    base.update(kw)
    return DeviceKnobs(**base)


def _metrics(tmp_path, pop, task_id, round_id):
    from fcp_server.storage.blobs import make_blob_store

    blobs = make_blob_store((tmp_path / "blobs").as_uri())
    return json.loads(blobs.get(f"{pop}/{task_id}/{round_id}/s/0/metrics", max_bytes=1 << 20))


def test_devices_only_ever_compute_on_their_own_records(app, digits_plans):
    seen: dict[str, set[bytes]] = {}
    lock = threading.Lock()

    def observed(job):
        with lock:
            seen.setdefault(job.device_id, set()).update(job.records)
        return run_compute_job(job)

    config = make_config(population="own_data")
    summary, fleet = _run(
        app, config, digits_plans, knobs=_knobs(), compute=observed, rounds_goal=1
    )
    assert summary["stop_reason"] == "goal reached", summary
    owned = {
        d.device_id: {r for c in d.data.collections.values() for r in c} for d in fleet.devices
    }
    assert seen and all(records <= owned[dev] for dev, records in seen.items())
    for dev, records in seen.items():
        others = set().union(*(owned[o] for o in owned if o != dev))
        assert not records & others


def test_thirty_percent_dropout_still_completes_rounds(app, digits_plans, tmp_path):
    config = make_config(population="dropout", report_goal=4, over_selection=0.5)
    summary, _ = _run(app, config, digits_plans, knobs=_knobs(dropout_rate=0.3), rounds_goal=2)
    counts = summary["counts"]
    assert summary["stop_reason"] == "goal reached", summary
    assert counts["dropouts"] > 0 and counts["uploads"] >= 2 * 4
    train_id = next(k for k, v in summary["tasks"].items() if v["kind"] == "training")
    assert _metrics(tmp_path, "dropout", train_id, 2)


def test_crashes_network_errors_and_duplicate_uploads_are_survived(app, digits_plans):
    config = make_config(population="flaky")
    knobs = _knobs(crash_after_report_rate=0.2, network_error_rate=0.15, duplicate_upload_rate=0.5)
    summary, _ = _run(app, config, digits_plans, knobs=knobs, rounds_goal=2)
    counts = summary["counts"]
    assert summary["stop_reason"] == "goal reached", summary
    assert counts["crashes_after_report"] > 0
    assert summary["network_errors_injected"] > 0 and summary["http_retries"] > 0
    assert (
        counts.get("duplicate_uploads.accepted", 0) + counts.get("duplicate_uploads.refused", 0) > 0
    )


def test_too_few_examples_reports_not_eligible(app, digits_plans):
    config = make_config(population="needs_more", min_examples=10_000)
    summary, _ = _run(
        app, config, digits_plans, knobs=_knobs(), rounds_goal=1, duration=8.0, with_eval=False
    )
    counts = summary["counts"]
    assert summary["stop_reason"] == "duration elapsed"
    assert counts["reports.NOT_ELIGIBLE"] > 0
    assert counts.get("uploads", 0) == 0 and counts.get("reports.COMPLETED", 0) == 0


def test_old_client_versions_are_rejected_with_a_long_retry_window(app, digits_plans):
    config = make_config(population="old_devices")
    old = VersionMix((("1", 1.0),))
    summary, _ = _run(app, config, digits_plans, knobs=_knobs(), versions=old, duration=5.0)
    counts = summary["counts"]
    assert counts["rejections.CLIENT_VERSION_MISMATCH"] == counts["check_ins"] > 0
    # A 1-2 day window at time scale 0.01 is 864-1728 s: each device checked in once.
    assert counts["check_ins"] <= 16
