"""An eval round start racing the eval task's cancel: no round starts under a CANCELED task.

`eval_rounds.maybe_start_eval_round` reads the eval task as OPEN, selects a training result,
then claims the next iteration and writes the round's checkpoint. A cancel committing in
between must make the claim fail. Only PostgreSQL interleaves the two transactions (SQLite
serialises writers with BEGIN IMMEDIATE).
"""

import pytest
from sqlalchemy import select

from fcp_server.services import blob_paths, eval_rounds, eval_selection, task_cancel
from fcp_server.storage.models import Round, Task, TaskStatus
from tests.integration.server import testkit
from tests.integration.server.testkit import POP


def test_a_cancel_inside_an_eval_round_start_leaves_no_round(api, ctx, worker, monkeypatch):
    if ctx.database.engine.dialect.name != "postgresql":
        pytest.skip("needs two transactions at once: SQLite serialises writers")
    api.open_training(testkit.training_task(report_goal=1, rounds=2))
    api.contribute_to(1, testkit.update_bytes())
    assert worker.tick().rounds_closed == 1  # training result 1 exists
    created = api.created(testkit.eval_task(report_goal=1, rounds=5, training_task_id=1)).task
    api.upload_eval_artifacts(created)
    with monkeypatch.context() as m:  # opened idle, so the start below is the first
        m.setattr(eval_rounds, "maybe_start_eval_round", lambda **_: None)
        assert api.task_call(POP, created.task_id, "open").status_code == 200
    select_result = eval_selection.select_training_result

    def cancel_meanwhile(*args, **kwargs):
        # After the start read the eval task as OPEN, before it claims the iteration.
        monkeypatch.setattr(eval_selection, "select_training_result", select_result)
        with ctx.database.sessions() as other, other.begin():
            task_cancel.cancel_task(
                session=other, pop=POP, task_id=created.task_id, now=ctx.clock.now()
            )
        return select_result(*args, **kwargs)

    monkeypatch.setattr(eval_selection, "select_training_result", cancel_meanwhile)
    with ctx.database.sessions() as session, session.begin():
        task = session.scalar(select(Task).where(Task.task_id == created.task_id))
        assert task is not None and task.status == TaskStatus.OPEN
        started = eval_rounds.maybe_start_eval_round(
            session=session, blobs=ctx.blobs, task=task, now=ctx.clock.now()
        )

    assert started is None
    with ctx.database.sessions() as session:
        task = session.scalar(select(Task).where(Task.task_id == created.task_id))
        assert task is not None and task.status == TaskStatus.CANCELED
        assert task.current_iteration == 0
        assert not session.scalars(select(Round).where(Round.task_pk == task.id)).all()
    assert not ctx.blobs.exists(blob_paths.client_checkpoint_blob(POP, created.task_id, 1))
