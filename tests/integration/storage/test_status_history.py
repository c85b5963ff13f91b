"""Status-history rows (`transitions.record_change`) belong to the caller's transaction."""

import datetime as dt

import pytest
from sqlalchemy import select

from fcp_server.storage import transitions
from fcp_server.storage.models import AssignmentStatus, EntityKind, RoundStatus, StatusChange

NOW = dt.datetime(2026, 12, 7, 1, 2, 3, 456789, tzinfo=dt.UTC)


class _Boom(Exception):
    pass


def _rows(database):
    with database.sessions() as session:
        return [
            (r.entity, r.entity_id, r.from_status, r.to_status, r.changed_at, r.reason)
            for r in session.scalars(select(StatusChange).order_by(StatusChange.id))
        ]


def test_changes_are_stored_in_call_order_with_their_values(database):
    # Arrange
    with database.sessions() as session, session.begin():
        # Act
        transitions.record_change(
            session, EntityKind.ROUND, 7, None, RoundStatus.COLLECTING, now=NOW
        )
        transitions.record_change(
            session,
            EntityKind.ASSIGNMENT,
            "a-1",
            AssignmentStatus.ASSIGNED,
            AssignmentStatus.LOCAL_COMPLETED,
            now=NOW,
            reason="report",
        )
    # Assert
    rows = _rows(database)
    assert [r[:4] + r[5:] for r in rows] == [
        (EntityKind.ROUND, "7", None, "COLLECTING", ""),
        (EntityKind.ASSIGNMENT, "a-1", "ASSIGNED", "LOCAL_COMPLETED", "report"),
    ]
    assert all(r[4].replace(tzinfo=dt.UTC) == NOW for r in rows)


def test_a_change_is_seen_later_in_its_transaction(database):
    # Arrange
    with database.sessions() as session, session.begin():
        transitions.record_change(
            session, EntityKind.ROUND, 1, RoundStatus.COLLECTING, RoundStatus.AGGREGATING, now=NOW
        )
        # Act
        seen = session.scalars(select(StatusChange.to_status)).all()
    # Assert
    assert seen == ["AGGREGATING"]


def test_a_rolled_back_transaction_leaves_no_change(database):
    # Arrange
    with pytest.raises(_Boom), database.sessions() as session, session.begin():
        transitions.record_change(
            session, EntityKind.ROUND, 1, RoundStatus.COLLECTING, RoundStatus.AGGREGATING, now=NOW
        )
        # Act
        raise _Boom
    # Assert
    assert _rows(database) == []


def test_reasons_are_cut_at_2000_characters(database):
    # Arrange
    with database.sessions() as session, session.begin():
        # Act
        transitions.record_change(
            session,
            EntityKind.ROUND,
            1,
            RoundStatus.APPLYING,
            RoundStatus.FAILED,
            now=NOW,
            reason="x" * 2500,
        )
    # Assert
    assert _rows(database)[0][5] == "x" * 2000
