"""Check-in's cache of open rounds (`services.round_cache`), SQLite and PostgreSQL.

The cache may only choose which round to try: every answer must be the one a fresh read of
the rounds gives, whatever changed since the cache was filled. The manual clock stands
still, so an entry lives until a test moves the clock past the TTL.
"""

import datetime as dt
import threading

from sqlalchemy import func, select

from fcp_server.app import worker_deps
from fcp_server.protos import common_pb2
from fcp_server.services.checkin import SHORT_RETRY
from fcp_server.storage.models import Assignment, Round, RoundStatus
from fcp_server.worker import Worker
from tests.integration.server import testkit
from tests.integration.server.testkit import Api

_Reason = common_pb2.RejectionReason
NOT_ELIGIBLE = testkit.task_assignments_pb2.ReportResultRequest.NOT_ELIGIBLE


def _rounds(ctx) -> list[tuple[int, RoundStatus, int]]:
    with ctx.database.sessions() as session:
        return [
            (r.iteration_id, r.status, r.active_count)
            for r in session.scalars(select(Round).order_by(Round.id))
        ]


def _assignments(ctx) -> int:
    with ctx.database.sessions() as session:
        return session.scalar(select(func.count()).select_from(Assignment))


def test_a_full_round_is_rejected_as_a_fresh_read_rejects_it(api, ctx):
    api.open_training(testkit.training_task(report_goal=2, max_size=2))
    api.assign()  # fills the cache: the round has room for 2
    api.assign()  # from the cache: now full

    resp, answer = api.checkin()  # the cached round looks open; its claim fails

    assert resp.status_code == 200
    assert answer.rejection_info.reason == _Reason.NO_TASK_AVAILABLE
    window = answer.rejection_info.retry_window
    assert (window.delay_min.seconds, window.delay_max.seconds) == SHORT_RETRY
    assert _rounds(ctx) == [(1, RoundStatus.COLLECTING, 2)]


def test_a_round_that_was_full_in_the_cache_is_assigned_once_a_slot_frees(api, ctx, clock):
    api.open_training(testkit.training_task(report_goal=2, max_size=2))
    first, _ = api.assign(), api.assign()
    clock.advance(ctx.settings.checkin_round_cache_seconds)
    assert api.checkin()[0].status_code == 200  # read afresh: cached as full
    assert [r.active_count for r in ctx.round_cache.get(testkit.POP, clock.now())] == [2]
    api.report(first, NOT_ELIGIBLE)  # gives its slot back

    again = api.assign()

    assert again.proto.aggregation_id == "1"
    assert _rounds(ctx) == [(1, RoundStatus.COLLECTING, 2)]


def test_a_round_closed_after_caching_gets_no_assignment_the_next_round_does(api, ctx, worker):
    api.open_training(testkit.training_task(report_goal=1, max_size=3, rounds=2))
    api.contribute()  # caches round 1 with room for 2 more
    worker.tick()  # round 1 reached its goal: closed, round 2 opens

    a = api.assign()

    assert a.proto.aggregation_id == "2"
    assert _rounds(ctx) == [(1, RoundStatus.COMPLETED, 1), (2, RoundStatus.COLLECTING, 1)]


def test_a_task_canceled_after_caching_gets_no_assignment(api, ctx):
    task = api.open_training(testkit.training_task(report_goal=2, max_size=4))
    api.assign()  # caches the task's open round
    assert api.task_call(testkit.POP, task.task_id, "cancel").status_code == 200

    resp, answer = api.checkin()

    assert resp.status_code == 200
    assert answer.rejection_info.reason == _Reason.NO_ACTIVE_TASK_EXISTS
    assert _assignments(ctx) == 1


def _cache_training_round_then_open_an_eval_round(api, worker) -> None:
    """Training round 2 is cached (weight 1); then an EVAL_ONLY task opens (weight 10,000)."""
    api.open_training(testkit.training_task(report_goal=1, rounds=3, max_size=100, weight=1))
    api.contribute()
    worker.tick()  # round 1 closes, round 2 opens
    assert api.assign().proto.aggregation_id == "2"  # read afresh: round 2 is cached
    evaluation = testkit.eval_task(report_goal=1, max_size=100, weight=10_000, training_task_id=1)
    api.upload_eval_artifacts(api.created(evaluation).task)
    assert api.task_call(testkit.POP, 2, "open").status_code == 200  # its round 1 opens at once


def test_a_round_opened_after_caching_is_drawn_once_the_ttl_passed(api, ctx, clock, worker):
    _cache_training_round_then_open_an_eval_round(api, worker)
    before = {api.assign().proto.task_id for _ in range(5)}
    clock.advance(ctx.settings.checkin_round_cache_seconds)

    after = {api.assign().proto.task_id for _ in range(5)}

    assert before == {"1"}  # the cached rows did not know the eval round yet
    assert "2" in after


def test_with_a_ttl_of_0_every_check_in_reads_the_rounds(make_app, clock):
    app = make_app(checkin_round_cache_seconds=0)
    api, ctx = Api(app.test_client()), app.extensions["fcp"]
    worker = Worker(worker_deps(ctx))
    _cache_training_round_then_open_an_eval_round(api, worker)

    assigned = {api.assign().proto.task_id for _ in range(5)}

    assert "2" in assigned
    assert ctx.round_cache.get(testkit.POP, clock.now()) is None


def test_concurrent_check_ins_through_the_cache_never_exceed_the_capacity(app, api, ctx):
    capacity, threads, attempts = 6, 4, 5
    api.open_training(testkit.training_task(report_goal=capacity, max_size=capacity))
    api.assign()  # every later check-in starts from the cached round
    barrier = threading.Barrier(threads)
    statuses: list[int] = []

    def check_in_many() -> None:
        client = Api(app.test_client())
        barrier.wait()
        for _ in range(attempts):
            statuses.append(client.checkin()[0].status_code)

    runners = [threading.Thread(target=check_in_many) for _ in range(threads)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()

    assert sorted(set(statuses)) == [200, 201]
    assert statuses.count(201) == capacity - 1
    assert _rounds(ctx) == [(1, RoundStatus.COLLECTING, capacity)]
    assert _assignments(ctx) == capacity


def test_an_entry_read_later_than_now_counts_as_expired(api, ctx, clock):
    # A system clock stepped back must not stretch an entry's life beyond its TTL.
    api.open_training()
    api.assign()
    later = clock.now()
    assert ctx.round_cache.get(testkit.POP, later) is not None
    assert ctx.round_cache.get(testkit.POP, later - dt.timedelta(microseconds=1)) is None
