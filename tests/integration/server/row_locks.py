"""Waiting, in a race test, until another transaction blocks on a PostgreSQL row lock."""

import time

from sqlalchemy import text

_WAITING = text(
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


def wait_until_blocked(ctx, what: str) -> None:
    """Returns once some session of this database waits on a lock; fails after 30 s.

    Args:
        ctx: The test's app context (its `database` is the one the blocked session uses).
        what: The blocked operation, named in the failure message.
    """
    for _ in range(600):
        with ctx.database.engine.connect() as conn:
            if conn.execute(_WAITING).scalar_one() > 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"{what} never waited on a lock")
