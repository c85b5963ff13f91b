"""Privacy accounting of open rounds, computed in the background before the rounds close.

The epsilon a round close records (`dp_budget.after_rounds`) depends only on the task's DP
setup and on how many rounds will have been aggregated, and both are known as soon as a round
starts collecting. Building the one-round privacy loss distribution of the Poisson-sampled
Gaussian (`dp_accounting`'s connect-the-dots discretisation, Doroshenko et al. 2022, arXiv
2207.04380) takes seconds for sampling rates around 0.1, and composing it (by FFT, Koskela et
al. 2020, arXiv 1906.03049) about 0.1 s per round count: time that would otherwise
sit between a round's last upload and its checkpoint. The worker hands every COLLECTING
training round of a DP task to one daemon thread, which asks `dp_budget.after_rounds` the
question the close will ask. `accounting`'s caches keep the answers, and its lock makes a close
that arrives first wait for the computation in flight rather than start a second one.
"""

import collections
import logging
import queue
import threading

from sqlalchemy import select

from fcp_server.protos import plan_pb2
from fcp_server.services import dp_budget
from fcp_server.services.round_close import EXPECTED_ERRORS, Deps
from fcp_server.storage.models import Round, RoundStatus, Task, TaskKind

_LOG = logging.getLogger(__name__)
# (task pk, iteration) pairs already handed over; old ones are forgotten first.
_MAX_REMEMBERED = 4096

_Job = tuple[plan_pb2.ServerPlan, int, int]  # (plan, task's total_iteration, rounds done)


class AccountingPrefetch:
    """One background thread that warms the accounting caches for rounds still collecting."""

    def __init__(self) -> None:
        self._seen: collections.OrderedDict[tuple[int, int], None] = collections.OrderedDict()
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def look_ahead(self, deps: Deps) -> int:
        """Queues the accounting of every COLLECTING training round not queued before.

        Returns:
            How many rounds were queued.
        """
        with deps.database.reads() as session:
            rows = session.execute(
                select(Task, Round.iteration_id)
                .join(Round, Round.task_pk == Task.id)
                .where(Round.status == RoundStatus.COLLECTING, Task.kind == TaskKind.TRAINING)
            ).all()
        queued = 0
        for task, iteration in rows:
            key = (task.id, iteration)
            if key in self._seen:
                continue
            try:  # an outage propagates, and the round is looked at again next time
                plan = deps.plans.server_plan(deps.blobs, task, deps.settings.max_artifact_bytes)
                setup = dp_budget.dp_setup(plan)
            except EXPECTED_ERRORS as e:
                # The close meets the same error and fails the round the usual way.
                _LOG.warning("no accounting ahead for task %s round %d: %s", task.id, iteration, e)
                setup = None
            self._remember(key)
            if setup is None:
                continue
            self._submit((plan, task.total_iteration, iteration))
            queued += 1
        return queued

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until every queued job is done (tests, shutdown); False on timeout."""
        done = threading.Event()

        def wait() -> None:
            self._jobs.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def _remember(self, key: tuple[int, int]) -> None:
        self._seen[key] = None
        while len(self._seen) > _MAX_REMEMBERED:
            self._seen.popitem(last=False)

    def _submit(self, job: _Job) -> None:
        self._jobs.put(job)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                # A daemon: accounting ahead of time must never keep the process alive.
                self._thread = threading.Thread(
                    target=self._run, name="fcp-accounting-prefetch", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            plan, total_iteration, rounds_done = self._jobs.get()
            try:
                dp_budget.after_rounds(plan, total_iteration, rounds_done)
            except Exception:  # the close repeats the question and reports the error
                _LOG.exception("accounting ahead of round %d failed", rounds_done)
            finally:
                self._jobs.task_done()
