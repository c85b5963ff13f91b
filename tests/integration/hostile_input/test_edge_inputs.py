"""Regression cases for the 5xx and bad behaviour the fuzzers found, on SQLite and PostgreSQL.

Each input once answered 500 or was accepted when it should not have been: ids beyond what
the id columns hold, JSON bodies json_format trips over (not an object, lone surrogates, deep
nesting), names whose trailing newline passed a `$`-anchored pattern, and listing a population
with an invalid name.
"""

import json

import pytest
from sqlalchemy import func, select

from fcp_server.storage.models import MAX_ID, Task
from tests.integration.server import testkit
from tests.integration.server.testkit import Api

TM = "/taskmanagement/v1/population"
TA = "/taskassignment/v1/population"
_CHECKIN = f"{TA}/digits:create-task-assignment"

_HUGE_IDS = [MAX_ID + 1, 2**63, 10**40]
_HOSTILE_JSON = {
    "number": b"1128",
    "null": b"null",
    "array": b"[1]",
    "string": b'"clientVersion"',
    "lone surrogate key": b'{"\\ud800": 1}',
    "lone surrogate value": b'{"clientVersion": {"versionCode": "\\udc00"}}',
    "deep nesting": b"[" * 100_000,
    "duplicate key": b'{"clientVersion": {}, "clientVersion": {}}',
    "newline in version": json.dumps({"clientVersion": {"versionCode": "5\n"}}).encode(),
}


def _assert_error(resp, status: int) -> None:
    assert resp.status_code == status, resp.get_data(as_text=True)[:300]
    error = resp.get_json()["error"]
    assert error["code"] == status and error["message"], error


@pytest.mark.parametrize("task_id", _HUGE_IDS)
@pytest.mark.parametrize(
    ("method", "template"),
    [
        ("get", TM + "/digits/tasks/{}:get"),
        ("post", TM + "/digits/tasks/{}:open"),
        ("post", TM + "/digits/tasks/{}:cancel"),
        ("put", TM + "/digits/tasks/{}/artifacts/checkpoint"),
        ("get", TA + "/digits/task/{}/client_only_plan"),
        (
            "put",
            TA + "/digits/task/1/aggregation/{}/task-assignment/"
            "0f0f0f0f-0f0f-4f0f-8f0f-0f0f0f0f0f0f:report-result",
        ),
    ],
)
def test_ids_beyond_the_id_columns_are_404(app, method, template, task_id):
    resp = getattr(app.test_client(), method)(
        template.format(task_id), data=b"", headers={"Content-Type": "application/x-protobuf"}
    )

    _assert_error(resp, 404)


@pytest.mark.parametrize("case", sorted(_HOSTILE_JSON))
def test_hostile_json_bodies_are_400(app, case):
    resp = app.test_client().post(
        _CHECKIN, data=_HOSTILE_JSON[case], headers={"Content-Type": "application/json"}
    )

    _assert_error(resp, 400)


def test_population_with_a_trailing_newline_is_refused(app):
    api = Api(app.test_client())

    _assert_error(api.create(testkit.training_task(), pop="digits%0A"), 400)
    _assert_error(app.test_client().get(f"{TM}/digits%0A/tasks"), 400)
    with app.extensions["fcp"].database.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Task)) == 0


def test_listing_an_invalid_population_is_400(app):
    _assert_error(app.test_client().get(f"{TM}/%C2%AF/tasks"), 400)


def test_eval_task_naming_a_training_id_beyond_the_column_is_400(app):
    api = Api(app.test_client())

    resp = api.create(testkit.eval_task(training_task_id=2**40))

    _assert_error(resp, 400)
