"""A live population to attack: an OPEN training task with assignments in every upload state."""

from dataclasses import dataclass

from flask import Flask

from fcp_server.worker import Worker
from tests.integration.server import testkit
from tests.integration.server.testkit import Api

REPORT_GOAL = 3
# What the "uploaded" assignment of an upload world sent (a replay sends it again).
UPLOADED = testkit.update_bytes()


@dataclass(frozen=True)
class Population:
    """Ids of a population whose task 1 round 1 is COLLECTING (1 of 3 updates in)."""

    pop: str
    task_id: int
    round_id: int
    # ASSIGNED (not reported yet), LOCAL_COMPLETED (may upload), UPLOAD_COMPLETED (counted).
    assigned: testkit.Assignment
    reported: testkit.Assignment
    uploaded: testkit.Assignment
    upload_location: str

    def path_options(self) -> list[dict[str, object]]:
        """Path parameters that name live entities, one dict per assignment state."""
        base = {"pop": self.pop, "task_id": self.task_id, "round_id": self.round_id}
        return [
            {**base, "result_id": 0, "assignment_id": a.proto.assignment_id}
            for a in (self.assigned, self.reported, self.uploaded)
        ]


def open_population(app: Flask, pop: str) -> Population:
    """Opens a training task (goal 3) in `pop` and brings three devices to three states."""
    api = Api(app.test_client())
    task = api.open_training(testkit.training_task(report_goal=REPORT_GOAL, max_size=6), pop=pop)
    uploaded = api.contribute(pop=pop)
    reported = api.assign(pop)
    resp, answer = api.report(reported)
    assert resp.status_code == 200 and answer.HasField("upload_instruction"), answer
    assigned = api.assign(pop)
    return Population(
        pop=pop,
        task_id=task.task_id,
        round_id=int(reported.proto.aggregation_id),
        assigned=assigned,
        reported=reported,
        uploaded=uploaded,
        upload_location=answer.upload_instruction.upload_location,
    )


@dataclass(frozen=True)
class UploadWorld:
    """A population whose round 1 COMPLETED and round 2 is COLLECTING (1 of 2 updates in).

    `stale` reported COMPLETED in round 1 but never uploaded before the round closed.
    """

    pop: str
    task_id: int
    round_id: int
    reported: testkit.Assignment
    uploaded: testkit.Assignment
    assigned: testkit.Assignment
    stale: testkit.Assignment

    def target_path(self, target: str, other: "UploadWorld", verb: str) -> str:
        """The URL an attack aimed at `target` uses (`other` is another population's world)."""
        live = {
            "reported": self.reported,
            "uploaded": self.uploaded,
            "assigned": self.assigned,
            "stale": self.stale,
        }
        if target in live:
            return f"{live[target].base}:{verb}"
        base = self.reported.base
        if target == "foreign":
            return f"{base.rsplit('/', 1)[0]}/{FOREIGN_ID}:{verb}"
        if target == "other_population":  # a real assignment, under this population's URL
            other_id = other.reported.proto.assignment_id
            return f"{base.rsplit('/', 1)[0]}/{other_id}:{verb}"
        if target == "next_round":
            return f"{base.replace('/aggregation/2/', '/aggregation/3/')}:{verb}"
        if target == "previous_round_url":  # a round-2 assignment under round 1's URL
            return f"{base.replace('/aggregation/2/', '/aggregation/1/')}:{verb}"
        assert target == "malformed", target
        return f"{base.rsplit('/', 1)[0]}/{FOREIGN_ID.upper()}:{verb}"


FOREIGN_ID = "0f0f0f0f-0f0f-4f0f-8f0f-0f0f0f0f0f0f"


def open_upload_world(app: Flask, worker: Worker, pop: str) -> UploadWorld:
    """Opens a task (goal 2, 3 rounds) in `pop`, completes round 1 and sets up round 2."""
    api = Api(app.test_client())
    task = api.open_training(testkit.training_task(report_goal=2, rounds=3, max_size=6), pop=pop)
    stale = api.assign(pop)
    assert api.report(stale)[0].status_code == 200
    api.contribute(testkit.update_bytes(0.3), pop=pop)
    api.contribute(testkit.update_bytes(0.1), pop=pop)
    assert worker.tick().rounds_closed >= 1  # (may also close an older world's round)
    uploaded = api.contribute(UPLOADED, pop=pop)
    reported = api.assign(pop)
    assert api.report(reported)[0].status_code == 200
    assigned = api.assign(pop)
    assert reported.proto.aggregation_id == "2", reported.proto
    return UploadWorld(pop, task.task_id, 2, reported, uploaded, assigned, stale)
