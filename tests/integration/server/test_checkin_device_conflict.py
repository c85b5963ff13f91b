"""Check-in of a device that already holds the round: the claimed slot is given back.

With device auth the unique (round, device) index is the last word on "one assignment per
round". `round_slots.take_slot` claims the slot first and inserts the assignment only then, so
when the index skips the insert (a concurrent check-in of the same device won), the claim
must be undone in the same transaction: no row written, the round's count unchanged.
Runs on SQLite and PostgreSQL.
"""

from sqlalchemy import func, select

from fcp_server.services import round_slots
from fcp_server.storage.models import Assignment, EntityKind, Round, StatusChange
from tests.integration.server import testkit

DEVICE = "d" * 64


def _state(ctx) -> tuple[int, int, int]:
    with ctx.database.sessions() as session:
        assignments = session.scalar(select(func.count()).select_from(Assignment))
        history = session.scalar(
            select(func.count())
            .select_from(StatusChange)
            .where(StatusChange.entity == EntityKind.ASSIGNMENT)
        )
        return assignments, history, session.scalar(select(Round.active_count))


def test_a_skipped_assignment_gives_its_slot_back(api, ctx, clock):
    api.open_training(testkit.training_task(report_goal=3, max_size=6))
    with ctx.database.sessions() as session:
        round_pk = session.scalars(select(Round.id)).one()
    with ctx.database.engine.begin() as conn:
        held = round_slots.take_slot(conn, round_pk, "100", DEVICE, clock.now())
    assert held is not None
    assert _state(ctx) == (1, 1, 1)

    # The race the held-rounds read cannot see: the same device, the same round, again.
    with ctx.database.engine.begin() as conn:
        assert round_slots.take_slot(conn, round_pk, "100", DEVICE, clock.now()) is None

    assert _state(ctx) == (1, 1, 1)
    # Another device still gets the slot the refused claim gave back.
    with ctx.database.engine.begin() as conn:
        other = round_slots.take_slot(conn, round_pk, "100", "e" * 64, clock.now())
    assert other is not None
    assert _state(ctx) == (2, 2, 2)
