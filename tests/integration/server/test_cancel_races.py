"""A task cancel racing its rounds' own moves: no active round outlives its canceled task.

`tasks.cancel_task` reads the task's active rounds and cancels each with a compare-and-swap
from the status it read. A round that moves on meanwhile (the upload filling its goal moves it
COLLECTING -> AGGREGATING) must still be canceled, or the worker would aggregate it and publish
a result for a canceled task. Only PostgreSQL interleaves the two transactions (SQLite
serialises writers with BEGIN IMMEDIATE).
"""

import pytest
from sqlalchemy import select

from fcp_server.services import tasks
from fcp_server.storage import transitions
from fcp_server.storage.models import Round, RoundStatus, Task, TaskStatus
from tests.integration.server import testkit
from tests.integration.server.testkit import POP


def test_a_round_moving_on_during_a_cancel_is_canceled_too(api, ctx, monkeypatch):
    if ctx.database.engine.dialect.name != "postgresql":
        pytest.skip("needs two transactions at once: SQLite serialises writers")
    task_id = api.open_training(testkit.training_task(report_goal=2, max_size=4)).task_id
    move_round = transitions.move_round

    def round_moves_meanwhile(session, round_pk, *args, **kwargs):
        # After the cancel read the round as COLLECTING, before its compare-and-swap.
        monkeypatch.setattr(transitions, "move_round", move_round)
        with ctx.database.sessions() as other, other.begin():
            assert move_round(
                other,
                round_pk,
                RoundStatus.COLLECTING,
                RoundStatus.AGGREGATING,
                now=ctx.clock.now(),
                reason="goal reached",
            )
        return move_round(session, round_pk, *args, **kwargs)

    monkeypatch.setattr(transitions, "move_round", round_moves_meanwhile)
    with ctx.database.sessions() as session, session.begin():
        tasks.cancel_task(session=session, pop=POP, task_id=task_id, now=ctx.clock.now())

    with ctx.database.sessions() as session:
        task = session.scalar(select(Task).where(Task.task_id == task_id))
        assert task is not None and task.status == TaskStatus.CANCELED
        statuses = session.scalars(select(Round.status).where(Round.task_pk == task.id)).all()
    assert statuses == [RoundStatus.CANCELED]
