"""The upload that completes a round's goal rings the workers' doorbell (SQLite and PostgreSQL)."""

import pytest

from fcp_server.storage import round_doorbell
from tests.integration.server import testkit


@pytest.fixture
def doorbell(db_url):
    listener = round_doorbell.listen(db_url)
    assert listener is not None
    yield listener
    listener.close()


def test_only_the_upload_that_completes_the_goal_rings(api, doorbell):
    # Arrange
    api.open_training(testkit.training_task(report_goal=2, max_size=3))
    # Act
    api.contribute()
    before_goal = doorbell.wait(0.2)
    api.contribute()
    at_goal = doorbell.wait(10.0)
    # Assert
    assert (before_goal, at_goal) == (False, True)


def test_a_refused_late_upload_does_not_ring(api, doorbell):
    # Arrange: a third device holds a slot while two others complete the goal
    api.open_training(testkit.training_task(report_goal=2, max_size=3))
    late = api.assign()
    _, answer = api.report(late)
    api.contribute()
    api.contribute()
    assert doorbell.wait(10.0)
    # Act
    refused = api.upload(answer.upload_instruction.upload_location, testkit.update_bytes())
    # Assert
    assert refused.status_code == 409
    assert not doorbell.wait(0.2)
