"""A short-lived, per-process cache of each population's open rounds, read by check-in.

Nearly every check-in of a busy population reads the same rows (`round_slots.active_rounds`).
`OpenRoundsCache` keeps a process's last read of a population for the server setting
`checkin_round_cache_seconds` (0 turns it off), so a typical anonymous check-in on PostgreSQL is
one statement: the slot claim.

Why a stale entry cannot give a device a wrong answer (see `checkin.check_in`):

- Cached rows only choose which round to try. An assignment exists only once the claim
  (`round_slots.take_slot`) succeeds, and its conditional UPDATE checks the current row: the
  round is COLLECTING and has room. So the cache can never over-assign, nor assign to a round
  that closed or filled meanwhile. A task leaves OPEN only together with its rounds: cancelling
  moves its active rounds out of COLLECTING in the same transaction (`task_cancel.cancel_task`), and
  a task completes or fails only after its round did (`rounds`), so the round's status covers
  the task's too.
- The other fields check-in uses (client versions, traffic weight, plan and checkpoint digests,
  task info) never change while a round is active.
- No rejection is decided on cached rows: when they give one, or a claim on a cached round
  fails, the entry is dropped and check-in starts over on a fresh read, so the device gets
  exactly the answer a fresh read gives.
- What staleness can cost is bounded by the TTL: a round opened meanwhile is not drawn until
  the entry expires (the failed claim above finds a replaced round at once).

Each process (gunicorn worker, host) has a cache of its own; they need no coordination, since
the database decides. Expiry uses the request's time from the server's clock, so tests move it.
"""

import datetime as dt
import math
import threading

from sqlalchemy import Connection

from fcp_server.services.round_slots import OpenRound, active_rounds

# Entries are only stored for populations with active rounds, i.e. with real tasks; the cap
# only guards memory should that ever be a great many.
_MAX_POPULATIONS = 1024


class OpenRoundsCache:
    """Each population's open rounds as last read by this process, for `ttl_seconds`.

    Thread-safe (gthread workers share it). The stored tuples are never mutated.
    """

    def __init__(self, ttl_seconds: float) -> None:
        if not (math.isfinite(ttl_seconds) and ttl_seconds >= 0):
            raise ValueError(f"ttl_seconds must be finite and >= 0, got {ttl_seconds}")
        self._ttl = dt.timedelta(seconds=ttl_seconds)
        self._lock = threading.Lock()
        # pop -> (read at, expires at, rounds)
        self._entries: dict[str, tuple[dt.datetime, dt.datetime, tuple[OpenRound, ...]]] = {}
        # Bumped by every invalidation: a read that started before one is not stored, so it
        # cannot put back rows older than those that failed.
        self._generation = 0

    def get(self, pop: str, now: dt.datetime) -> tuple[OpenRound, ...] | None:
        """The population's cached rounds, or None when not cached or expired at `now`.

        An entry read "after" `now` (the clock was stepped back) counts as expired too, so a
        clock change cannot stretch an entry's life beyond its TTL.
        """
        with self._lock:
            entry = self._entries.get(pop)
        if entry is None or not entry[0] <= now < entry[1]:
            return None
        return entry[2]

    def read(self, conn: Connection, pop: str, now: dt.datetime) -> tuple[OpenRound, ...]:
        """Reads the population's rounds from the database and caches them until `now` + TTL."""
        with self._lock:
            generation = self._generation
        rounds = tuple(active_rounds(conn, pop))
        # Nothing active means a rejection, which is never taken from the cache: not stored.
        if rounds and self._ttl:
            with self._lock:
                if generation == self._generation:
                    if len(self._entries) >= _MAX_POPULATIONS and pop not in self._entries:
                        self._entries.clear()
                    self._entries[pop] = (now, now + self._ttl, rounds)
        return rounds

    def invalidate(self, pop: str) -> None:
        """Drops the population's entry, and any read started before, in this process."""
        with self._lock:
            self._generation += 1
            self._entries.pop(pop, None)
