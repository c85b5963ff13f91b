"""Device API: check-in, every rejection reason, report-result and downloads."""

import gzip
import hashlib

from sqlalchemy import select

from fcp_server.protos import common_pb2, task_assignments_pb2
from fcp_server.services import auth
from fcp_server.storage.models import Assignment, AssignmentStatus, DeviceToken, Round
from tests.integration.server import testkit
from tests.integration.server.testkit import POP, Api

Reason = common_pb2.RejectionReason
Result = task_assignments_pb2.ReportResultRequest


def _rejected(api, version="100"):
    resp, answer = api.checkin(version=version)
    assert resp.status_code == 200
    assert answer.WhichOneof("result") == "rejection_info"
    info = answer.rejection_info
    return info.reason, (info.retry_window.delay_min.seconds, info.retry_window.delay_max.seconds)


def test_checkin_returns_a_complete_task_assignment(api):
    task = api.open_training()

    resp, answer = api.checkin()

    assert resp.status_code == 201
    a = answer.task_assignment
    assert (a.population_name, a.task_id, a.aggregation_id) == (POP, str(task.task_id), "1")
    assert len(a.assignment_id) == 36
    assert a.task_name == f"/population/{POP}/task/1"
    assert a.self_uri == f"/population/{POP}/task/1/aggregation/1/task-assignment/{a.assignment_id}"
    assert a.plan.uri == f"/taskassignment/v1/population/{POP}/task/1/client_only_plan"
    assert a.init_checkpoint.uri.endswith("/task/1/aggregation/0/client_checkpoint")
    assert a.plan.compression_format == common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP
    policy = a.eligibility_task_info.eligibility_policies[0].min_sep_policy
    assert (policy.current_index, policy.minimum_separation) == (1, 1)
    assert a.HasField("report_deadline")


def test_no_task_means_no_active_task_exists(api):
    assert _rejected(api) == (Reason.NO_ACTIVE_TASK_EXISTS, (86400, 172800))
    api.created(testkit.training_task())  # CREATED, not open: still nothing active
    assert _rejected(api)[0] == Reason.NO_ACTIVE_TASK_EXISTS


def test_client_version_outside_the_range_is_a_mismatch(api):
    api.open_training(testkit.training_task(min_version="100", max_version="200"))

    assert _rejected(api, version="99") == (Reason.CLIENT_VERSION_MISMATCH, (86400, 172800))
    assert _rejected(api, version="201")[0] == Reason.CLIENT_VERSION_MISMATCH
    assert api.checkin(version="200")[0].status_code == 201


def test_non_numeric_version_is_a_bad_request(api):
    api.open_training()
    resp, _ = api.checkin(version="1.2")
    assert resp.status_code == 400


def test_full_round_answers_no_task_available_and_a_failure_frees_the_slot(api):
    api.open_training(testkit.training_task(report_goal=2, max_size=2))
    first, _second = api.assign(), api.assign()

    assert _rejected(api) == (Reason.NO_TASK_AVAILABLE, (60, 300))

    resp, answer = api.report(first, Result.FAILED)
    assert resp.status_code == 200 and answer == task_assignments_pb2.ReportResultResponse()
    assert api.checkin()[0].status_code == 201


def test_zero_weight_is_never_chosen_and_all_zero_is_no_active_task(api):
    api.open_training(testkit.training_task(weight=0))
    assert _rejected(api)[0] == Reason.NO_ACTIVE_TASK_EXISTS


def test_report_completed_gives_an_upload_instruction(api, ctx):
    api.open_training()
    a = api.assign()

    resp, answer = api.report(a)

    assert resp.status_code == 200
    up = answer.upload_instruction
    assert up.upload_location == f"{a.base}:upload"
    assert up.compression_format == common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP
    assert up.extra_request_headers["Content-Encoding"] == "gzip"
    assert up.max_upload_bytes == ctx.settings.max_upload_bytes
    # A retried report gets the same instruction.
    assert api.report(a)[1].upload_instruction.upload_location == up.upload_location


def test_every_failure_result_is_recorded(api, ctx):
    api.open_training(testkit.training_task(report_goal=5, max_size=10))
    expected = {
        Result.FAILED: AssignmentStatus.LOCAL_FAILED,
        Result.NOT_ELIGIBLE: AssignmentStatus.LOCAL_NOT_ELIGIBLE,
        Result.FAILED_EXAMPLE_GENERATION: AssignmentStatus.LOCAL_FAILED_EXAMPLE_GENERATION,
        Result.FAILED_MODEL_COMPUTATION: AssignmentStatus.LOCAL_FAILED_MODEL_COMPUTATION,
        Result.FAILED_OPS_ERROR: AssignmentStatus.LOCAL_FAILED_OPS_ERROR,
    }
    for result, status in expected.items():
        a = api.assign()
        assert api.report(a, result)[0].status_code == 200
        with ctx.database.sessions() as session:
            assert session.get(Assignment, a.proto.assignment_id).status == status
    with ctx.database.sessions() as session:
        assert session.scalar(select(Round.active_count)) == 0
    assert api.report(api.assign(), Result.UNKNOWN)[0].status_code == 400


def test_unknown_or_foreign_assignment_is_404(api):
    api.open_training()
    a = api.assign()
    zero = "00000000-0000-4000-8000-000000000000"

    assert api.report(a, base=a.base.replace(a.proto.assignment_id, zero))[0].status_code == 404
    assert (
        api.report(a, base=a.base.replace("/aggregation/1/", "/aggregation/2/"))[0].status_code
        == 404
    )
    assert api.report(a, base=a.base.replace("/task/1/", "/task/9/"))[0].status_code == 404
    other_pop = a.base.replace(f"/population/{POP}/", "/population/other/")
    assert api.report(a, base=other_pop)[0].status_code == 404


def test_downloads_have_etag_304_cache_control_and_gzip(api, blobs):
    api.open_training()
    a = api.assign()
    plan_bytes = blobs.get(f"{POP}/1/0/s/0/client_only_plan")

    resp = api.client.get(a.proto.plan.uri, headers={"Accept-Encoding": "gzip"})
    assert resp.status_code == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(resp.data) == plan_bytes
    digest = hashlib.sha256(plan_bytes).hexdigest()
    assert resp.headers["ETag"] == f'"{digest}"'
    assert a.proto.plan.sha256_checksum == digest
    assert "max-age" in resp.headers["Cache-Control"]

    assert (
        api.client.get(a.proto.plan.uri, headers={"If-None-Match": f'"{digest}"'}).status_code
        == 304
    )
    ckpt = api.client.get(a.proto.init_checkpoint.uri)
    assert ckpt.status_code == 200 and "Content-Encoding" not in ckpt.headers
    assert hashlib.sha256(ckpt.data).hexdigest() == a.proto.init_checkpoint.sha256_checksum
    missing = a.proto.init_checkpoint.uri.replace("/aggregation/0/", "/aggregation/5/")
    assert api.client.get(missing).status_code == 404


def test_device_auth_requires_an_issued_unexpired_token(make_app, clock):
    app = make_app(device_auth=True)
    admin = Api(app.test_client())
    admin.open_training()
    ctx = app.extensions["fcp"]
    with ctx.database.sessions() as session, session.begin():
        token = auth.issue_token(session, now=clock.now(), ttl_days=1)
        assert len(token) >= 32

    resp, answer = Api(app.test_client()).checkin()
    assert resp.status_code == 401
    assert answer.rejection_info.reason == Reason.UNAUTHENTICATED
    assert (
        Api(app.test_client(), {auth.DEVICE_TOKEN_HEADER: "nope"}).checkin()[0].status_code == 401
    )
    device = Api(app.test_client(), {auth.DEVICE_TOKEN_HEADER: token})
    a = device.assign()
    assert Api(app.test_client()).report(a)[0].status_code == 401
    assert device.report(a)[0].status_code == 200
    with ctx.database.sessions() as session:
        stored = session.scalars(select(DeviceToken.token_sha256)).all()
    assert stored == [auth.token_digest(token)]  # only the hash is stored
    clock.advance(2 * 86400)
    assert device.checkin()[0].status_code == 401
