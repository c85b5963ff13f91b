"""A task cancel racing its rounds' own moves: no active round outlives its canceled task.

`task_cancel.cancel_task` reads the task's active rounds and cancels each with a compare-and-swap
from the status it read. A round that moves on meanwhile (the upload filling its goal moves it
COLLECTING -> AGGREGATING) must still be canceled, or the worker would aggregate it and publish
a result for a canceled task. A round close commits its round and then updates its task; the
cancel must take the same order, or PostgreSQL breaks the lock cycle by killing one of them.
Only PostgreSQL interleaves the two transactions (SQLite serialises writers with BEGIN
IMMEDIATE).
"""

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from fcp_server.services import rounds, task_cancel
from fcp_server.storage import transitions
from fcp_server.storage.models import Round, RoundStatus, Task, TaskStatus
from tests.integration.server import testkit
from tests.integration.server.row_locks import while_blocked
from tests.integration.server.testkit import POP


def _needs_postgres(ctx) -> None:
    if ctx.database.engine.dialect.name != "postgresql":
        pytest.skip("needs two transactions at once: SQLite serialises writers")


def test_a_round_moving_on_during_a_cancel_is_canceled_too(api, ctx, monkeypatch):
    _needs_postgres(ctx)
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
        task_cancel.cancel_task(session=session, pop=POP, task_id=task_id, now=ctx.clock.now())

    with ctx.database.sessions() as session:
        task = session.scalar(select(Task).where(Task.task_id == task_id))
        assert task is not None and task.status == TaskStatus.CANCELED
        statuses = session.scalars(select(Round.status).where(Round.task_pk == task.id)).all()
    assert statuses == [RoundStatus.CANCELED]


def test_a_cancel_during_a_round_close_commit_does_not_deadlock(api, ctx):
    _needs_postgres(ctx)
    task_id = api.open_training(testkit.training_task(report_goal=1, rounds=3)).task_id
    api.contribute_to(task_id, testkit.update_bytes())  # round 1 is AGGREGATING
    # The close's commit: round 1 COMPLETED (its row locked until the commit)...
    close = ctx.database.sessions()
    close.begin()
    rnd = close.scalar(select(Round).where(Round.status == RoundStatus.AGGREGATING))
    assert rnd is not None
    assert transitions.move_round(
        close, rnd.id, RoundStatus.AGGREGATING, RoundStatus.COMPLETED, now=ctx.clock.now()
    )

    # ... while an administrator cancels the task and reaches that round.
    def cancel(session: Session) -> None:
        task_cancel.cancel_task(session=session, pop=POP, task_id=task_id, now=ctx.clock.now())

    with while_blocked(ctx, close, cancel, "the cancel") as failures:
        # The close then moves its task on (round 2 starts) and commits.
        task = close.get(Task, rnd.task_pk)
        assert task is not None
        rounds.advance_after_close(
            session=close,
            task=task,
            rnd=rnd,
            now=ctx.clock.now(),
            budget_exhausted=False,
            checkpoint_sha256="0" * 64,
        )
        close.commit()

    assert not failures, failures
    with ctx.database.sessions() as session:
        task = session.scalar(select(Task).where(Task.task_id == task_id))
        assert task is not None and task.status == TaskStatus.CANCELED
        states = session.execute(
            select(Round.iteration_id, Round.status).where(Round.task_pk == task.id)
        ).all()
    # The round the close committed stays COMPLETED; the one it started is canceled.
    assert sorted(tuple(row) for row in states) == [
        (1, RoundStatus.COMPLETED),
        (2, RoundStatus.CANCELED),
    ]
