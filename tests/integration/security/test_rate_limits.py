"""Per-token rate limits: 429 with Retry-After, one budget shared by every web worker."""

import threading

from sqlalchemy import func, select

from fcp_server.services import rate_limits
from fcp_server.storage.models import RateLimitCounter
from tests.integration.security.security_kit import device, issue_tokens
from tests.integration.server import testkit

LIMIT = 3
WINDOW = 60


def _limited(make_app, **overrides):
    app = make_app(
        device_auth=True,
        rate_limit_requests=LIMIT,
        rate_limit_window_seconds=WINDOW,
        **overrides,
    )
    testkit.Api(app.test_client()).open_training()
    return app


def _plan_url(pop: str = testkit.POP) -> str:
    return f"/taskassignment/v1/population/{pop}/task/1/client_only_plan"


def test_a_token_over_its_budget_gets_429_with_retry_after(make_app, clock):
    app = _limited(make_app)
    (token,) = issue_tokens(app, clock, 1)
    alice = device(app, token)
    for _ in range(LIMIT):
        assert alice.checkin()[0].status_code in (200, 201)
    resp, _ = alice.checkin()
    assert resp.status_code == 429
    error = resp.get_json()["error"]
    assert error["status"] == "RESOURCE_EXHAUSTED"
    assert f"rate limit of {LIMIT} requests per {WINDOW} s exceeded" in error["message"]
    expected = rate_limits.seconds_left(clock.now().timestamp(), WINDOW)
    assert resp.headers["Retry-After"] == str(expected)
    # Every device route counts against the same budget (downloads too).
    assert alice.client.get(_plan_url(), headers=alice.headers).status_code == 429

    clock.advance(expected)  # the next window
    assert alice.checkin()[0].status_code in (200, 201)


def test_budgets_are_per_token(make_app, clock):
    app = _limited(make_app)
    first, second = issue_tokens(app, clock, 2)
    for _ in range(LIMIT + 2):
        device(app, first).checkin()
    assert device(app, first).checkin()[0].status_code == 429
    assert device(app, second).checkin()[0].status_code in (200, 201)
    # Unauthenticated calls are refused before they can spend anyone's budget.
    assert testkit.Api(app.test_client()).checkin()[0].status_code == 401


def test_the_budget_is_shared_by_every_worker(make_app, clock):
    """Two apps on one database stand for two gunicorn workers (or hosts)."""
    workers = [_limited(make_app), make_app(device_auth=True, rate_limit_requests=LIMIT)]
    (token,) = issue_tokens(workers[0], clock, 1)
    statuses = [device(workers[i % 2], token).checkin()[0].status_code for i in range(LIMIT + 2)]
    assert [s == 429 for s in statuses] == [False] * LIMIT + [True, True]


def test_concurrent_requests_never_exceed_the_budget(make_app, clock):
    app = _limited(make_app)
    (token,) = issue_tokens(app, clock, 1)
    statuses: list[int] = []
    barrier = threading.Barrier(10)

    def call() -> None:
        barrier.wait()
        client = device(app, token)
        statuses.append(client.client.get(_plan_url(), headers=client.headers).status_code)

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * LIMIT + [429] * (10 - LIMIT)


def test_old_windows_are_dropped(make_app, clock):
    app = _limited(make_app)
    (token,) = issue_tokens(app, clock, 1)
    for _ in range(4):
        device(app, token).checkin()
        clock.advance(WINDOW)
    with app.extensions["fcp"].database.sessions() as session:
        assert session.scalar(select(func.count()).select_from(RateLimitCounter)) == 1


def test_the_worker_prunes_the_counters_of_callers_that_stopped_calling(make_app, clock):
    from fcp_server.aggregation import make_noise_rng
    from fcp_server.services.plan_cache import PlanCache
    from fcp_server.services.round_close import Deps
    from fcp_server.worker import Worker

    app = _limited(make_app)
    ctx = app.extensions["fcp"]
    tokens = issue_tokens(app, clock, 3)
    for token in tokens:  # three callers, each once, then silence
        device(app, token).checkin()
    worker = Worker(
        Deps(
            database=ctx.database,
            blobs=ctx.blobs,
            clock=ctx.clock,
            settings=ctx.settings,
            plans=PlanCache(),
            rng_factory=make_noise_rng,
            metrics=ctx.metrics,
        )
    )

    def rows() -> int:
        with ctx.database.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(RateLimitCounter)))

    worker.tick()
    assert rows() == 3  # the current window is kept
    clock.advance(WINDOW)
    worker.tick()
    assert rows() == 3  # and so is the previous one
    clock.advance(WINDOW)
    worker.tick()
    assert rows() == 0


def test_without_device_auth_callers_are_limited_by_address(make_app, clock):
    app = make_app(rate_limit_requests=LIMIT, rate_limit_window_seconds=WINDOW)
    api = testkit.Api(app.test_client())
    api.open_training()  # admin calls are not device calls: not counted
    statuses = [api.checkin()[0].status_code for _ in range(LIMIT + 1)]
    assert statuses[-1] == 429 and 429 not in statuses[:-1]
    other = testkit.Api(app.test_client())
    other.client.environ_base["REMOTE_ADDR"] = "10.0.0.7"
    assert other.checkin()[0].status_code in (200, 201)


def test_the_demo_default_does_not_limit(api):
    api.open_training()
    assert all(api.checkin()[0].status_code in (200, 201) for _ in range(30))


def test_the_api_description_documents_429_on_every_device_route(api):
    document = api.client.get("/openapi.json").get_json()
    device_ops = [
        op
        for path, ops in document["paths"].items()
        if path.startswith("/taskassignment/")
        for op in ops.values()
    ]
    assert device_ops
    for op in device_ops:
        assert op["responses"]["429"] == {"$ref": "#/components/responses/RateLimited"}
    limited = document["components"]["responses"]["RateLimited"]
    assert limited["headers"]["Retry-After"]["required"] is True
