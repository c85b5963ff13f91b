"""The SQLite doorbell: a FIFO beside the database file, rung without blocking."""

import os

from fcp_server.storage import round_doorbell


def _url(tmp_path):
    return f"sqlite:///{tmp_path / 'fcp.db'}"


def test_rings_wake_the_listener_and_are_consumed(tmp_path):
    # Arrange
    listener = round_doorbell.listen(_url(tmp_path))
    assert listener is not None
    try:
        quiet = listener.wait(0.0)
        # Act: two rings before the listener looks
        round_doorbell.ring_after_commit(_url(tmp_path))
        round_doorbell.ring_after_commit(_url(tmp_path))
        rung = listener.wait(5.0)
        after = listener.wait(0.0)
    finally:
        listener.close()
    # Assert: one look covers both rings
    assert (quiet, rung, after) == (False, True, False)


def test_a_ring_with_no_listener_is_dropped(tmp_path):
    # Act: before any listener existed, then after the only one closed
    round_doorbell.ring_after_commit(_url(tmp_path))
    missing = not os.path.exists(round_doorbell.fifo_path(str(tmp_path / "fcp.db")))
    listener = round_doorbell.listen(_url(tmp_path))
    assert listener is not None
    listener.close()
    round_doorbell.ring_after_commit(_url(tmp_path))
    # Assert: nothing raised, and ringing created nothing
    assert missing


def test_a_ring_reaches_a_listener_that_was_busy_meanwhile(tmp_path):
    # Arrange
    listener = round_doorbell.listen(_url(tmp_path))
    assert listener is not None
    try:
        round_doorbell.ring_after_commit(_url(tmp_path))
        # Act: the listener looks only later (it was closing a round)
        rung = listener.wait(0.0)
    finally:
        listener.close()
    # Assert
    assert rung


def test_no_listener_when_the_path_is_not_a_fifo(tmp_path):
    # Arrange
    (tmp_path / ("fcp.db" + "-fcp-rounds-ready")).write_text("not a fifo")
    # Act / Assert
    assert round_doorbell.listen(_url(tmp_path)) is None


def test_other_databases_have_no_fifo_to_ring(tmp_path):
    # Act / Assert: nothing to ring for PostgreSQL after the commit (NOTIFY rang inside it)
    round_doorbell.ring_after_commit("postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert list(tmp_path.iterdir()) == []
