"""Race tests on PostgreSQL: a second transaction run while the first holds a row lock."""

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from sqlalchemy import text
from sqlalchemy.orm import Session

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


@contextlib.contextmanager
def while_blocked(
    ctx, holder: Session, work: Callable[[Session], object], what: str
) -> Iterator[list[BaseException]]:
    """Runs `work` in a transaction of its own in a thread, and enters once it waits on a lock.

    The body then finishes `holder`'s transaction (the lock's owner). Yields the list of
    failures: the thread's, and the body's own, which is recorded rather than raised after
    `holder` is rolled back, so the test asserts on the list. On exit `holder` is closed and
    the thread joined.
    """
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with ctx.database.sessions() as session, session.begin():
                work(session)
        except BaseException as e:
            failures.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_until_blocked(ctx, what)
        yield failures
    except BaseException as e:
        failures.append(e)
        holder.rollback()
    finally:
        holder.close()  # releases the lock, should the body not have
        thread.join()
