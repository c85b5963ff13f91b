"""The background worker loop: timeouts, deadlines, stale claims, eval scheduling, round close.

ODP runs this work in its task scheduler and collector services under a distributed lock
(odp-federated-compute.md section 2.1). Here every step is a compare-and-swap on the shared
database, so any number of workers (threads in web processes or `fcp-server worker`
processes on any host) can run the same loop at once without locks: whoever wins a CAS does
the work, the others skip it.
"""

import dataclasses
import logging
import threading

from fcp_server.services import maintenance, round_close

_LOG = logging.getLogger(__name__)


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
        closed = sum(
            round_close.close_round(deps, pk) for pk in round_close.aggregating_rounds(deps)
        )
        report = TickReport(expired, leftovers, rounds_expired, recovered, started, closed)
        if report != TickReport():
            _LOG.info("worker tick: %s", dataclasses.asdict(report))
        return report

    def run(self, stop: threading.Event) -> None:
        """Ticks every `worker_interval_seconds` until `stop` is set.

        A failing tick is logged and retried on the next one: this is the top-level handler
        of the background loop.
        """
        interval = self._deps.settings.worker_interval_seconds
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # keep the loop alive; CAS makes retries safe
                _LOG.exception("worker tick failed")
            stop.wait(interval)


def start_in_background(worker: Worker) -> tuple[threading.Thread, threading.Event]:
    """Starts the loop in a daemon thread (the embedded demo); returns it and its stop flag."""
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="fcp-worker", daemon=True)
    thread.start()
    return thread, stop
