"""The background worker loop: timeouts, deadlines, stale claims, eval scheduling, round close.

ODP runs this work in its task scheduler and collector services under a distributed lock
(odp-federated-compute.md section 2.1). Here every step is a compare-and-swap on the shared
database, so any number of workers (threads in web processes or `fcp-server worker`
processes on any host) can run the same loop at once without locks: whoever wins a CAS does
the work, the others skip it.
"""

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from fcp_server.services import maintenance, rate_limits, round_close
from fcp_server.services.accounting_prefetch import AccountingPrefetch
from fcp_server.storage import availability, round_doorbell

_LOG = logging.getLogger(__name__)
# Longest a doorbell wait goes without looking at the stop flag, seconds.
STOP_CHECK_SECONDS = 0.1


@dataclasses.dataclass(frozen=True)
class TickReport:
    """What one tick did (for logs and tests)."""

    expired_assignments: int = 0
    canceled_assignments: int = 0
    expired_rounds: int = 0
    recovered_applies: int = 0
    eval_rounds_started: int = 0
    rounds_closed: int = 0


class Worker:
    """Runs the maintenance steps and closes rounds, tick after tick."""

    def __init__(self, deps: round_close.Deps) -> None:
        self._deps = deps
        # Claims an outage kept this worker from releasing: round pk -> claim (see
        # `round_close.ClaimNotReleased`); retried every tick until the database answers.
        self._unreleased: dict[int, int] = {}
        # The rate-limit window whose stale counters this worker last pruned.
        self._pruned_window: int | None = None
        # The loop's look-ahead: epsilon of the rounds still collecting, before they close.
        self.accounting = AccountingPrefetch()
        # Rung by the upload that completes a round's goal; set while `run` runs.
        self._doorbell: round_doorbell.Listener | None = None

    def tick(self) -> TickReport:
        """One pass over every background duty; each step in its own transaction."""
        deps = self._deps
        now = deps.clock.now()
        settings = deps.settings
        with deps.database.sessions() as session, session.begin():
            expired = maintenance.expire_assignments(session, now=now, settings=settings)
        with deps.database.sessions() as session, session.begin():
            leftovers = maintenance.cancel_leftover_assignments(session, now=now)
        with deps.database.sessions() as session, session.begin():
            rounds_expired = maintenance.expire_rounds(session, now=now, settings=settings)
        with deps.database.sessions() as session, session.begin():
            recovered = maintenance.recover_stale_applies(session, now=now, settings=settings)
        with deps.database.sessions() as session, session.begin():
            started = maintenance.schedule_eval_rounds(session, blobs=deps.blobs, now=now)
        window = rate_limits.window_start(now.timestamp(), settings.rate_limit_window_seconds)
        if settings.rate_limit_requests and window != self._pruned_window:
            # Once per rate-limit window is enough: counters only expire when windows turn.
            with deps.database.sessions() as session, session.begin():
                rate_limits.prune(
                    session, now=now, window_seconds=settings.rate_limit_window_seconds
                )
            self._pruned_window = window
        closed = self._close_rounds()
        report = TickReport(expired, leftovers, rounds_expired, recovered, started, closed)
        if report != TickReport():
            _LOG.info("worker tick: %s", dataclasses.asdict(report))
        return report

    def _close_rounds(self) -> int:
        deps = self._deps
        for round_pk, claim in list(self._unreleased.items()):
            round_close.release(deps, round_pk, claim, reason="released after the outage")
            del self._unreleased[round_pk]
        closed = 0
        for round_pk in round_close.aggregating_rounds(deps):
            try:
                closed += round_close.close_round(deps, round_pk)
            except round_close.ClaimNotReleased as e:
                self._unreleased[e.round_pk] = e.claim
                raise
        return closed

    def run(self, stop: threading.Event) -> None:
        """Ticks every `worker_interval_seconds` until `stop` is set.

        After every tick, and after every close between ticks, it hands the rounds still
        collecting to `accounting` (`AccountingPrefetch`), so their epsilon is known by the
        time they close.

        Between two ticks it looks for rounds waiting to close whenever the upload that
        completes a round's goal rings the doorbell (`round_doorbell`), and, with
        `worker_close_poll_seconds` set, also every that many seconds, so a round that reached
        its goal is aggregated without waiting for the next full tick. A failing step is
        logged and retried later: this is the top-level handler of the background loop.
        """
        settings = self._deps.settings
        interval, poll = settings.worker_interval_seconds, settings.worker_close_poll_seconds
        self._doorbell = self._listen()
        try:
            while not stop.is_set():
                self._guarded(self.tick)
                self._guarded(self._look_ahead)
                next_tick = time.monotonic() + interval
                while (left := next_tick - time.monotonic()) > 0:
                    polling = 0 < poll < left
                    rung = self._wait(stop, poll if polling else left)
                    if stop.is_set():
                        return
                    if rung or polling:
                        self._guarded(self._close_and_look_ahead)
        finally:
            if self._doorbell is not None:
                self._doorbell.close()
                self._doorbell = None

    def _listen(self) -> round_doorbell.Listener | None:
        return round_doorbell.listen(self._deps.settings.database_url)

    def _wait(self, stop: threading.Event, seconds: float) -> bool:
        """Waits until the doorbell rings (True), `stop` is set or `seconds` passed."""
        deadline = time.monotonic() + seconds
        while self._doorbell is not None and not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                # In slices, so that a set `stop` ends the wait soon.
                if self._doorbell.wait(min(left, STOP_CHECK_SECONDS)):
                    return True
            except Exception:  # a broken listener: back to ticks and polls alone
                _LOG.exception("round doorbell failed; closing rounds on ticks and polls")
                with contextlib.suppress(Exception):
                    self._doorbell.close()
                self._doorbell = None
        stop.wait(max(0.0, deadline - time.monotonic()))
        return False

    def _look_ahead(self) -> None:
        self.accounting.look_ahead(self._deps)

    def _close_and_look_ahead(self) -> None:
        if self._close_rounds():  # a close opens the next round: start its accounting now
            self._look_ahead()

    @staticmethod
    def _guarded(step: Callable[[], object]) -> None:
        try:
            step()
        except (round_close.ClaimNotReleased, *availability.DEPENDENCY_ERRORS) as e:
            # An outage, not a bug: one line per step instead of a traceback.
            cause = e.__cause__ if isinstance(e, round_close.ClaimNotReleased) else e
            _LOG.warning(
                "worker tick stopped: the %s is unavailable (%s)",
                availability.unavailable_dependency(cause or e) or "database",
                e,
            )
        except Exception:  # keep the loop alive; CAS makes retries safe
            _LOG.exception("worker tick failed")


def start_in_background(worker: Worker) -> tuple[threading.Thread, threading.Event]:
    """Starts the loop in a daemon thread (the embedded demo); returns it and its stop flag."""
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="fcp-worker", daemon=True)
    thread.start()
    return thread, stop
