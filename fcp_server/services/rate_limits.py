"""Per-caller request rate limits: a fixed-window counter in the database, shared by workers.

Each request adds one to the row (caller, window start) with one atomic upsert (`INSERT ...
ON CONFLICT DO UPDATE SET count = count + 1 RETURNING count`, SQLite >= 3.35 and PostgreSQL
alike), so every gunicorn worker and host draws on the same budget; a counter in process
memory would give each worker a budget of its own. A fixed window lets a caller make up to
twice the limit across a window boundary, the usual price of its simplicity. The first
request of a new window deletes the caller's older rows, so the table holds about one row per
active caller; the worker's `prune` removes the rows of callers that stopped calling. Callers
are device tokens (their SHA-256, never the token) or, without device auth, client addresses.
"""

import dataclasses
import datetime as dt
import math

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fcp_server.storage.models import RateLimitCounter

_MAX_KEY_CHARS = 100


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of counting one request."""

    allowed: bool
    # Requests of the caller in the current window, this one included.
    count: int
    # Whole seconds until the window ends (when the caller may call again), at least 1.
    retry_after: int


def device_caller(token_sha256: str) -> str:
    """Rate-limit key of an authenticated device."""
    return f"device:{token_sha256}"[:_MAX_KEY_CHARS]


def address_caller(address: str | None) -> str:
    """Rate-limit key of an anonymous caller (device auth off)."""
    return f"addr:{address or 'unknown'}"[:_MAX_KEY_CHARS]


def window_start(epoch_seconds: float, window_seconds: int) -> int:
    """Start of the fixed window holding `epoch_seconds` (a multiple of `window_seconds`)."""
    if window_seconds <= 0:
        raise ValueError(f"window_seconds must be positive, got {window_seconds}")
    return math.floor(epoch_seconds / window_seconds) * window_seconds


def seconds_left(epoch_seconds: float, window_seconds: int) -> int:
    """Whole seconds until the current window ends, rounded up, at least 1 (Retry-After)."""
    end = window_start(epoch_seconds, window_seconds) + window_seconds
    return max(1, math.ceil(end - epoch_seconds))


def hit(
    session: Session, key: str, *, now: dt.datetime, limit: int, window_seconds: int
) -> Decision:
    """Counts one request of `key` and says whether it is within `limit` per window.

    Args:
        session: Open session inside the caller's transaction.
        key: The caller (`device_caller` or `address_caller`).
        now: Current time (aware).
        limit: Requests allowed per window, > 0.
        window_seconds: Window length.

    Raises:
        ValueError: If `limit` or `window_seconds` is not positive.
    """
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    epoch = now.timestamp()
    start = window_start(epoch, window_seconds)
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    upsert = (
        dialect.insert(RateLimitCounter)
        .values(key=key, window_start=start, count=1)
        .on_conflict_do_update(
            index_elements=[RateLimitCounter.key, RateLimitCounter.window_start],
            set_={"count": RateLimitCounter.count + 1},
        )
        .returning(RateLimitCounter.count)
    )
    count = int(session.execute(upsert).scalar_one())
    if count == 1:  # first request of a new window: the caller's older windows are spent
        session.execute(
            delete(RateLimitCounter).where(
                RateLimitCounter.key == key, RateLimitCounter.window_start < start
            )
        )
    return Decision(
        allowed=count <= limit, count=count, retry_after=seconds_left(epoch, window_seconds)
    )


def prune(session: Session, *, now: dt.datetime, window_seconds: int) -> int:
    """Deletes every counter of a window that ended before the previous one began.

    Returns:
        The number of rows deleted.
    """
    oldest_kept = window_start(now.timestamp(), window_seconds) - window_seconds
    result = session.execute(
        delete(RateLimitCounter).where(RateLimitCounter.window_start < oldest_kept)
    )
    return int(getattr(result, "rowcount", 0) or 0)
