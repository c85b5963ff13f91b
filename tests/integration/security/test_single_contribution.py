"""A device contributes at most once to a round, whatever it replays or re-sends.

With device auth on, the device's token (stored hashed) is its identity: it holds at most one
assignment per round, only it may report or upload for that assignment, a replayed upload is
acknowledged without being counted, and an assignment id only works in its own population,
task and round.
"""

import threading

from sqlalchemy import func, select

from fcp_server.protos import common_pb2, task_assignments_pb2
from fcp_server.services import auth
from fcp_server.storage.models import Assignment, AssignmentStatus, Round, RoundStatus, Task
from tests.integration.security.security_kit import device
from tests.integration.server import testkit
from tests.integration.server.testkit import POP, Api

Result = task_assignments_pb2.ReportResultRequest
Reason = common_pb2.RejectionReason


def _round(ctx, iteration: int = 1) -> Round:
    with ctx.database.sessions() as session:
        return session.scalars(
            select(Round)
            .join(Task, Round.task_pk == Task.id)
            .where(Task.population_name == POP, Round.iteration_id == iteration)
        ).one()


def _assignments(ctx) -> int:
    with ctx.database.sessions() as session:
        return session.scalar(select(func.count()).select_from(Assignment))


def _auth_app(make_app, **overrides):
    app = make_app(device_auth=True, **overrides)
    Api(app.test_client()).open_training(testkit.training_task(report_goal=3, max_size=6))
    return app


def test_a_device_gets_one_assignment_per_round(make_app, tokens, clock):
    app = _auth_app(make_app)
    ctx = app.extensions["fcp"]
    first, second = tokens(app, 2)
    alice = device(app, first)
    a = alice.assign()

    again, answer = alice.checkin()
    assert again.status_code == 200
    assert answer.rejection_info.reason == Reason.NO_TASK_AVAILABLE
    # Giving up the slot does not buy a second ticket to the same round either.
    assert alice.report(a, Result.FAILED)[0].status_code == 200
    assert alice.checkin()[1].rejection_info.reason == Reason.NO_TASK_AVAILABLE
    assert _assignments(ctx) == 1
    # Another device is not affected, and the database holds the hash, not the token.
    b = device(app, second).assign()
    with ctx.database.sessions() as session:
        keys = dict(session.execute(select(Assignment.id, Assignment.device_key)).all())
    assert keys == {
        a.proto.assignment_id: auth.token_digest(first),
        b.proto.assignment_id: auth.token_digest(second),
    }


def test_a_device_may_join_the_next_round(make_app, tokens, worker):
    app = _auth_app(make_app)
    ctx = app.extensions["fcp"]
    devices = [device(app, t) for t in tokens(app, 3)]
    for d in devices:
        d.contribute(testkit.update_bytes())
    assert worker.tick().rounds_closed == 1
    a = devices[0].assign()
    assert a.proto.aggregation_id == "2"
    assert _round(ctx, 1).aggregated_count == 3


def test_concurrent_check_ins_of_one_device_get_one_assignment(make_app, tokens):
    app = _auth_app(make_app)
    (token,) = tokens(app)
    statuses: list[int] = []
    barrier = threading.Barrier(8)

    def check_in() -> None:
        barrier.wait()
        statuses.append(device(app, token).checkin()[0].status_code)

    threads = [threading.Thread(target=check_in) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 7 + [201]
    rnd = _round(app.extensions["fcp"])
    assert rnd.active_count == 1  # the losers' slot claims were rolled back
    assert _assignments(app.extensions["fcp"]) == 1


def test_a_replayed_upload_is_counted_once(make_app, tokens, worker):
    app = _auth_app(make_app)
    ctx = app.extensions["fcp"]
    alice, *others = (device(app, t) for t in tokens(app, 3))
    a = alice.assign()
    _, answer = alice.report(a)
    location = answer.upload_instruction.upload_location
    data = testkit.update_bytes(0.3, 0.3)
    for _ in range(3):  # the original and two replays, compressed or not
        assert alice.upload(location, data).status_code == 204
        assert alice.upload(location, data, compress=False).status_code == 204
    assert _round(ctx).reported_count == 1
    different = alice.upload(location, testkit.update_bytes(0.9, 0.9))
    assert different.status_code == 409
    assert "different update" in different.get_json()["error"]["message"]
    # Reporting again does not reopen the assignment for a second update.
    assert alice.report(a)[0].status_code == 200
    assert _round(ctx).reported_count == 1

    for d in others:
        d.contribute(testkit.update_bytes())
    assert worker.tick().rounds_closed == 1
    assert alice.upload(location, data).status_code == 204  # acknowledged, not counted
    rnd = _round(ctx)
    assert (rnd.status, rnd.reported_count, rnd.aggregated_count) == (RoundStatus.COMPLETED, 3, 3)
    with ctx.database.sessions() as session:
        uploaded = session.execute(
            select(Assignment.device_key).where(
                Assignment.status == AssignmentStatus.UPLOAD_COMPLETED
            )
        ).all()
    assert len(uploaded) == len(set(uploaded)) == 3  # three distinct devices


def test_another_devices_assignment_id_is_not_found(make_app, tokens):
    app = _auth_app(make_app)
    ctx = app.extensions["fcp"]
    first, second = tokens(app, 2)
    alice, mallory = device(app, first), device(app, second)
    a = alice.assign()
    mallory.assign()  # mallory has an assignment of her own in the same round

    resp, _ = mallory.report(a)
    assert resp.status_code == 404
    _, answer = alice.report(a)
    location = answer.upload_instruction.upload_location
    stolen = mallory.upload(location, testkit.update_bytes())
    assert stolen.status_code == 404
    assert _round(ctx).reported_count == 0
    assert not ctx.blobs.list(f"{POP}/1/1/d/")  # nothing stored for the stolen id
    assert alice.upload(location, testkit.update_bytes()).status_code == 204
    assert _round(ctx).reported_count == 1


def test_an_assignment_id_only_works_in_its_own_population_task_and_round(make_app, tokens):
    app = _auth_app(make_app)
    ctx = app.extensions["fcp"]
    admin = Api(app.test_client())
    admin.open_training(testkit.training_task(report_goal=3), pop="other")
    (token,) = tokens(app)
    alice = device(app, token)
    a = alice.assign()
    _, answer = alice.report(a)
    good = answer.upload_instruction.upload_location
    aid = a.proto.assignment_id
    foreign = [
        good.replace(f"/population/{POP}/", "/population/other/"),
        good.replace("/task/1/", "/task/2/"),
        good.replace("/aggregation/1/", "/aggregation/2/"),
        good.replace("/aggregation/1/", "/aggregation/0/"),
        good.replace(aid, "00000000-0000-4000-8000-000000000000"),
    ]
    for url in foreign:
        assert alice.upload(url, testkit.update_bytes()).status_code == 404, url
        report_url = url.replace(":upload", "")
        assert alice.report(a, base=report_url)[0].status_code == 404, url
    assert _round(ctx).reported_count == 0
    assert not [n for n in ctx.blobs.list() if "/d/" in n and n.endswith("/gradient")]
    assert alice.upload(good, testkit.update_bytes()).status_code == 204
