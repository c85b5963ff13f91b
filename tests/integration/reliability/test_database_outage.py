"""PostgreSQL faults (issue 9, item 5): connections killed mid-transaction and the path cut.

Two real faults: `pg_terminate_backend` on the very connection running a chosen statement (from
an admin connection, right before the statement is sent: the transaction dies half done), and
a `TcpProxy` between the server and PostgreSQL that is cut (open connections reset, new ones
refused). Requests answer 503 with Retry-After, the transaction's half is rolled back, a retry
of the same call succeeds once, and the round close resumes (without waiting for its lease,
without spending its bounded attempts, publishing the same result).
"""

import threading
import time

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import make_url

from fcp_server.app import create_app, worker_deps
from fcp_server.services import blob_paths, round_close
from fcp_server.settings import ServerSettings
from fcp_server.storage import availability
from fcp_server.storage import db as fcp_db
from fcp_server.storage.models import Assignment, AssignmentStatus, Round, RoundStatus
from fcp_server.worker import Worker
from tests.fixtures.db import PG_HOST, PG_PORT, _admin_connection, _truncate_all
from tests.integration.reliability.tcp_proxy import TcpProxy
from tests.integration.server import testkit
from tests.integration.server.testkit import POP

UNAVAILABLE = "the database is temporarily unavailable; retry the request later"
# Statements (as SQLAlchemy renders them) in the middle of a transaction.
CHECKIN_INSERT = ("INSERT INTO assignments",)
UPLOAD_COUNT = ("UPDATE rounds SET reported_count",)
CLOSE_COMMIT = ("UPDATE rounds SET", "completed_at=")  # the APPLYING -> COMPLETED swap


@pytest.fixture
def database_url(postgres_database_url):
    _truncate_all(postgres_database_url)
    return postgres_database_url


def _server(url: str, blobs_dir) -> tuple[testkit.Api, Worker, object]:
    settings = ServerSettings(
        database_url=url,
        blob_url=blobs_dir.as_uri(),
        embedded_worker=False,
        auto_migrate=False,
        log_format="text",
    )
    app = create_app(settings)
    ctx = app.extensions["fcp"]
    return testkit.Api(app.test_client()), Worker(worker_deps(ctx)), ctx


def _on_statement(engine, fragments: tuple[str, ...], action) -> list[int]:
    """Runs `action(connection)` once, before the first statement containing all `fragments`."""
    fired: list[int] = []

    def before(conn, _cursor, statement, *_args) -> None:
        if not fired and all(f in statement for f in fragments):
            fired.append(1)
            action(conn)

    event.listen(engine, "before_cursor_execute", before)
    return fired


def _terminate(conn) -> None:
    pid = conn.connection.dbapi_connection.info.backend_pid
    with _admin_connection() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(100):  # until the backend is really gone
            row = admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
            if row.fetchone() is None:
                return
            time.sleep(0.05)
    raise AssertionError(f"backend {pid} did not terminate")


def _assert_unavailable(resp) -> None:
    assert resp.status_code == 503, resp.get_data(as_text=True)
    assert resp.headers["Retry-After"].isdigit()
    assert resp.get_json()["error"] == {
        "code": 503,
        "status": "UNAVAILABLE",
        "message": UNAVAILABLE,
    }


def _round(ctx, iteration: int = 1) -> Round:
    with ctx.database.sessions() as session:
        rnd = session.scalar(select(Round).where(Round.iteration_id == iteration))
        assert rnd is not None
        return rnd


@pytest.mark.postgres
def test_connections_killed_mid_transaction_roll_back_and_retries_succeed(database_url, tmp_path):
    # Arrange
    api, worker, ctx = _server(database_url, tmp_path / "blobs")
    api.open_training(testkit.training_task(report_goal=2, rounds=2))
    engine = ctx.database.engine

    # Act + Assert: a check-in whose INSERT dies takes no slot; the next check-in works.
    fired = _on_statement(engine, CHECKIN_INSERT, _terminate)
    _assert_unavailable(api.checkin()[0])
    assert fired and _round(ctx).active_count == 0
    first = api.assign()
    api.contribute(testkit.update_bytes(0.1, 0.1))  # another device: 1 of 2

    # An upload whose counting UPDATE dies is not counted; its retry is, once.
    _, answer = api.report(first)
    update = testkit.update_bytes(0.4, 0.4)
    fired = _on_statement(engine, UPLOAD_COUNT, _terminate)
    _assert_unavailable(api.upload(answer.upload_instruction.upload_location, update))
    assert fired and _round(ctx).reported_count == 1
    with ctx.database.sessions() as session:
        status = session.get(Assignment, first.proto.assignment_id).status
    assert status == AssignmentStatus.LOCAL_COMPLETED
    assert api.upload(answer.upload_instruction.upload_location, update).status_code == 204
    assert (_round(ctx).status, _round(ctx).reported_count) == (RoundStatus.AGGREGATING, 2)

    # A round close whose COMPLETED transition dies is released uncounted and finishes next tick
    # with the result it had already published.
    fired = _on_statement(engine, CLOSE_COMMIT, _terminate)
    assert worker.tick().rounds_closed == 0
    assert fired
    published = ctx.blobs.get(blob_paths.server_checkpoint_blob(POP, 1, 1))
    assert (_round(ctx).status, _round(ctx).apply_attempts) == (RoundStatus.AGGREGATING, 0)
    assert worker.tick().rounds_closed == 1
    assert (_round(ctx).status, _round(ctx).apply_attempts) == (RoundStatus.COMPLETED, 1)
    assert ctx.blobs.get(blob_paths.server_checkpoint_blob(POP, 1, 1)) == published
    assert _round(ctx, 2).status == RoundStatus.COLLECTING
    ctx.database.dispose()


@pytest.mark.postgres
def test_a_cut_database_path_answers_503_and_the_round_resumes_when_it_returns(
    database_url, tmp_path
):
    # Arrange: the server reaches PostgreSQL only through the proxy.
    proxy = TcpProxy(PG_HOST, PG_PORT)
    proxied = make_url(database_url).set(host="127.0.0.1", port=proxy.port)
    api, worker, ctx = _server(proxied.render_as_string(hide_password=False), tmp_path / "blobs")
    direct = fcp_db.connect(database_url)  # the test's own view, around the proxy
    try:
        api.open_training(testkit.training_task(report_goal=2, rounds=2))
        api.contribute(testkit.update_bytes(0.1, 0.1))
        waiting = api.assign()

        # Act + Assert: the path is cut; device calls answer 503 and the worker tick stops.
        proxy.cut()
        _assert_unavailable(api.checkin()[0])
        _assert_unavailable(api.report(waiting)[0])
        assert api.client.get("/ready").status_code == 503
        with pytest.raises(availability.DATABASE_ERRORS):
            worker.tick()

        # Back: the waiting device finishes and the round reaches its goal.
        proxy.restore()
        api.report(waiting)
        assert (
            api.upload(f"{waiting.base}:upload", testkit.update_bytes(0.2, 0.2)).status_code == 204
        )
        assert _round(ctx).status == RoundStatus.AGGREGATING

        # Cut in the middle of the round close: even the release fails, so the worker keeps
        # the claim and gives it back as soon as the database answers again.
        _on_statement(ctx.database.engine, CLOSE_COMMIT, lambda _conn: proxy.cut())
        with pytest.raises(round_close.ClaimNotReleased):
            worker.tick()
        with direct.sessions() as session:
            stuck = session.scalar(select(Round).where(Round.iteration_id == 1))
            assert (stuck.status, stuck.apply_attempts) == (RoundStatus.APPLYING, 1)
        proxy.restore()
        report = worker.tick()

        assert (report.recovered_applies, report.rounds_closed) == (0, 1)
        with direct.sessions() as session:
            rounds = session.scalars(select(Round).order_by(Round.iteration_id)).all()
            assert [(r.status, r.aggregated_count, r.apply_attempts) for r in rounds] == [
                (RoundStatus.COMPLETED, 2, 1),
                (RoundStatus.COLLECTING, 0, 0),
            ]
    finally:
        ctx.database.dispose()
        direct.dispose()
        proxy.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_hung_database_answers_503_instead_of_hanging_the_request(database_url, tmp_path):
    # Arrange: the server's path to PostgreSQL will stop answering without closing.
    proxy = TcpProxy(PG_HOST, PG_PORT)
    proxied = make_url(database_url).set(host="127.0.0.1", port=proxy.port)
    api, _, ctx = _server(proxied.render_as_string(hide_password=False), tmp_path / "blobs")
    try:
        api.open_training(testkit.training_task(report_goal=2))
        ctx.database.dispose()  # no pooled connection left: the next request must connect
        proxy.stall()
        answers: list[object] = []

        # Act: a check-in while the database hangs (in a thread: without a connect timeout it
        # would never return, and this test must fail rather than hang).
        thread = threading.Thread(target=lambda: answers.append(api.checkin()[0]), daemon=True)
        thread.start()
        thread.join(fcp_db.PG_CONNECT_TIMEOUT_S * 6)

        # Assert
        assert answers, "the request hung on the unresponsive database"
        _assert_unavailable(answers[0])
        proxy.restore()
        assert api.checkin()[0].status_code == 201
    finally:
        proxy.restore()
        ctx.database.dispose()
        proxy.close()
