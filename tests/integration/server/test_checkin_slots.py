"""Check-in slot claims: a claim lost to a full round leaves no trace (SQLite and PostgreSQL).

`round_slots.take_slot` takes the slot with the conditional UPDATE and writes the assignment and
its status change only if that succeeded; when the UPDATE finds the round full (another
check-in won the race), neither row may be written and the count must not move.
"""

import datetime as dt

import pytest
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


def test_a_taken_slot_writes_its_times_as_the_orm_does(api, ctx):
    # The slot's driver SQL converts `now` itself; the rows must hold exactly what the ORM
    # writes for that instant, or typed comparisons (deadlines, sweeps) would miss them. A
    # non-UTC offset and microseconds make any other rendering differ.
    api.open_training(testkit.training_task(report_goal=2, max_size=2))
    now = dt.datetime(2026, 3, 1, 1, 2, 3, 456_789, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with ctx.database.sessions() as session:
        round_pk = session.scalars(select(Round.id)).one()
    with ctx.database.engine.begin() as conn:
        assignment_id = round_slots.take_slot(conn, round_pk, "100", None, now)
    assert assignment_id is not None

    with ctx.database.sessions() as session:
        row = session.get(Assignment, assignment_id)
        assert row is not None
        assert (row.created_at, row.status_changed_at) == (now, now)
        assert row.created_at.utcoffset() == dt.timedelta(0)
        assert (row.client_version, row.device_key) == ("100", None)
        # Typed comparisons bind `now` through the column type: they match only the same value.
        assert (
            session.scalar(
                select(func.count()).select_from(Assignment).where(Assignment.created_at == now)
            )
            == 1
        )
        change = session.scalars(
            select(StatusChange).where(StatusChange.entity_id == assignment_id)
        ).one()
        assert change.changed_at == now
        assert (
            session.scalar(
                select(func.count()).select_from(StatusChange).where(StatusChange.changed_at == now)
            )
            == 1
        )


@pytest.mark.parametrize("device_key", [None, "d" * 64])
def test_a_taken_slot_commits_without_waiting_for_the_wal_flush_on_postgres(
    api, ctx, clock, device_key
):
    # The slot statement switches its own transaction to asynchronous commit; the anonymous
    # statement does so from the claim's RETURNING, which runs only for a claimed row.
    if ctx.database.engine.dialect.name != "postgresql":
        pytest.skip("synchronous_commit is PostgreSQL's")
    api.open_training(testkit.training_task(report_goal=2, max_size=2))
    with ctx.database.sessions() as session:
        round_pk = session.scalars(select(Round.id)).one()
    with ctx.database.engine.begin() as conn:
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
        assert round_slots.take_slot(conn, round_pk, "100", device_key, clock.now()) is not None
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
    with ctx.database.engine.connect() as conn:  # local to that transaction only
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"


@pytest.mark.parametrize("device_key", [None, "d" * 64])
def test_each_taken_slot_writes_one_assignment_one_history_row_and_one_count(
    api, ctx, clock, device_key
):
    # The anonymous statement on PostgreSQL reads the claim from the history INSERT's row
    # count: every claim must leave exactly its two rows, and a full round none.
    api.open_training(testkit.training_task(report_goal=3, max_size=3))
    with ctx.database.sessions() as session:
        round_pk = session.scalars(select(Round.id)).one()
    taken = []
    for i in range(4):
        key = None if device_key is None else f"{device_key[:-1]}{i}"
        with ctx.database.engine.begin() as conn:
            taken.append(round_slots.take_slot(conn, round_pk, "100", key, clock.now()))
    assert taken[3] is None and all(taken[:3])
    with ctx.database.sessions() as session:
        ids = set(session.scalars(select(Assignment.id)))
        history = list(
            session.scalars(
                select(StatusChange.entity_id).where(StatusChange.entity == EntityKind.ASSIGNMENT)
            )
        )
        active = session.scalar(select(Round.active_count))
    assert ids == set(taken[:3])
    assert sorted(history) == sorted(ids)
    assert active == 3
