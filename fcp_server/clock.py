"""Time source of the server, injected into services so timeouts and deadlines are testable.

Every timestamp the server stores or compares is a timezone-aware UTC `datetime` taken from a
`Clock`; production uses `SystemClock`, tests advance a `ManualClock` to drive the local
compute / upload timeouts and round deadlines without sleeping.
"""

import datetime as dt
import threading
from typing import Protocol


class Clock(Protocol):
    """Returns the current time as an aware UTC datetime."""

    def now(self) -> dt.datetime:
        """The current time (timezone-aware, UTC)."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> dt.datetime:
        """The current UTC time."""
        return dt.datetime.now(dt.UTC)


class ManualClock:
    """A clock that only moves when told to (for tests and simulations)."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        initial = start or dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
        if initial.tzinfo is None:
            raise ValueError("ManualClock start must be timezone-aware")
        self._now = initial
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        """The clock's current time."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> dt.datetime:
        """Moves the clock forward by `seconds` (>= 0) and returns the new time."""
        if seconds < 0:
            raise ValueError(f"ManualClock cannot go backwards (seconds={seconds})")
        with self._lock:
            self._now += dt.timedelta(seconds=seconds)
            return self._now
