"""The worker computes a collecting round's epsilon before the round closes (SQLite and PG)."""

import itertools
import json
import time

from fcp_server import accounting
from fcp_server.app import worker_deps
from fcp_server.protos import task_builder_pb2
from fcp_server.services import blob_paths
from fcp_server.worker import start_in_background
from tests.integration.server import testkit
from tests.integration.server.testkit import POP

REPORT_GOAL = 2
# A noise multiplier per task opened in this process: no earlier test has its epsilon cached.
_NOISE_MULTIPLIERS = (1.25 + k / 256 for k in itertools.count())


def _open_dp_task(api):
    plan = testkit.server_plan(
        report_goal=REPORT_GOAL,
        dp_type=task_builder_pb2.DpAggregator.FIXED_GAUSSIAN,
        noise_multiplier=next(_NOISE_MULTIPLIERS),
        clip_norm=1.0,
        population_size=40,
    )
    api.open_training(testkit.training_task(report_goal=REPORT_GOAL), plan=plan)
    return accounting.DpSetup.from_spec(plan.aggregation)


def test_look_ahead_computes_the_epsilon_the_close_records(api, app, worker, blobs):
    setup = _open_dp_task(api)
    prefetch = worker.accounting
    misses = accounting.epsilon_spent.cache_info().misses

    assert prefetch.look_ahead(worker_deps(app.extensions["fcp"])) == 1
    assert prefetch.wait_idle(timeout=120)
    assert accounting.epsilon_spent.cache_info().misses == misses + 1
    # The same round is not queued twice.
    assert prefetch.look_ahead(worker_deps(app.extensions["fcp"])) == 0

    hits = accounting.epsilon_spent.cache_info().hits
    for delta in (0.1, 0.2):
        api.contribute(testkit.update_bytes(delta, delta))
    assert worker.tick().rounds_closed == 1
    # The close asked the question already answered: a cache hit, nothing computed again.
    assert accounting.epsilon_spent.cache_info().misses == misses + 1
    assert accounting.epsilon_spent.cache_info().hits > hits
    metrics = json.loads(blobs.get(blob_paths.metrics_blob(POP, 1, 1)))
    assert metrics["server/dp/epsilon_spent"] == accounting.epsilon_spent(setup, 1)

    # Round 2 is collecting now: it is the one queued next.
    assert prefetch.look_ahead(worker_deps(app.extensions["fcp"])) == 1
    assert prefetch.wait_idle(timeout=120)
    assert accounting.epsilon_spent.cache_info().misses == misses + 2


def test_rounds_without_dp_are_not_queued(api, app, worker):
    api.open_training(testkit.training_task(report_goal=REPORT_GOAL))
    assert worker.accounting.look_ahead(worker_deps(app.extensions["fcp"])) == 0


def test_the_worker_loop_accounts_ahead_without_a_close(api, worker):
    _open_dp_task(api)
    misses = accounting.epsilon_spent.cache_info().misses
    thread, stop = start_in_background(worker)
    try:
        deadline = time.monotonic() + 120
        while accounting.epsilon_spent.cache_info().misses == misses:
            assert time.monotonic() < deadline, "the loop never accounted the open round"
            time.sleep(0.01)
        assert worker.accounting.wait_idle(timeout=120)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
