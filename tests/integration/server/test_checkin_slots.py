"""Check-in slot claims: a claim lost to a full round leaves no trace (SQLite and PostgreSQL).

`round_slots.take_slot` takes the slot with the conditional UPDATE and writes the assignment and
its status change only if that succeeded; when the UPDATE finds the round full (another
check-in won the race), neither row may be written and the count must not move.
"""

from sqlalchemy import func, select

from fcp_server.services import round_slots
from fcp_server.storage.models import Assignment, EntityKind, Round, StatusChange
from tests.integration.server import testkit


def test_a_lost_slot_claim_leaves_no_assignment_or_history_row(api, ctx, clock):
    api.open_training(testkit.training_task(report_goal=2, max_size=2))
    with ctx.database.sessions() as session:
        stale = session.scalars(select(Round.id)).one()  # read while the round still has room
    held = [api.assign(), api.assign()]  # now the round is full

    with ctx.database.engine.begin() as conn:
        # The race a concurrent check-in loses: it rated the round before it filled up.
        assert round_slots.take_slot(conn, stale, "100", None, clock.now()) is None

    with ctx.database.sessions() as session:
        ids = set(session.scalars(select(Assignment.id)))
        history = session.scalar(
            select(func.count())
            .select_from(StatusChange)
            .where(StatusChange.entity == EntityKind.ASSIGNMENT)
        )
        active = session.scalar(select(Round.active_count))
    assert ids == {a.proto.assignment_id for a in held}
    assert history == len(held)
    assert active == len(held)
