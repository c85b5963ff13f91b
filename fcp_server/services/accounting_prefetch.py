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

The Gaussian (PLD) accounting runs in a spawned process of its own, and its epsilons are handed
back to `accounting`: much of `dp_accounting`'s PLD work is Python loops over arrays of ~10^5
entries, which in a thread held the GIL for a tenth of a second or more per round while the
worker's own thread needed it to close the previous round (every SQLite call and file write
gives the GIL up and then waits up to the 5 ms switch interval to get it back). The process
runs at a lower priority (niceness +10), so on a host it shares with the web workers it takes
the CPU they leave. If it cannot be used, the thread computes in place as before.
"""

import collections
import concurrent.futures
import logging
import multiprocessing
import os
import queue
import threading
from concurrent.futures.process import BrokenProcessPool

from sqlalchemy import select

from fcp_server import accounting
from fcp_server.protos import plan_pb2
from fcp_server.services import dp_budget
from fcp_server.services.round_close import EXPECTED_ERRORS, Deps
from fcp_server.storage.models import Round, RoundStatus, Task, TaskKind

_LOG = logging.getLogger(__name__)
# (task pk, iteration) pairs already handed over; old ones are forgotten first.
_MAX_REMEMBERED = 4096

# The accounting process's niceness: background work takes the CPU that serving leaves.
ACCOUNTING_NICENESS = 10
_Job = tuple[plan_pb2.ServerPlan, int, int]  # (plan, task's total_iteration, rounds done)


def account_in_process(
    plan_bytes: bytes, total_iteration: int, rounds_done: int
) -> dict[int, float]:
    """The accounting process's job: the close's question; returns the setup's PLD epsilons."""
    plan = plan_pb2.ServerPlan.FromString(plan_bytes)
    dp_budget.after_rounds(plan, total_iteration, rounds_done)
    setup = dp_budget.dp_setup(plan)
    return {} if setup is None else accounting.known_pld_epsilons(setup)


class AccountingPrefetch:
    """One background thread that warms the accounting caches for rounds still collecting."""

    def __init__(self, *, own_process: bool = True) -> None:
        self._seen: collections.OrderedDict[tuple[int, int], None] = collections.OrderedDict()
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Whether PLD accounting runs in a process of its own (started with the first job).
        self._own_process = own_process
        self._process: concurrent.futures.ProcessPoolExecutor | None = None

    def look_ahead(self, deps: Deps) -> int:
        """Queues the accounting of every COLLECTING training round not queued before.

        Returns:
            How many rounds were queued.
        """
        with deps.database.sessions() as session:
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

    def close(self) -> None:
        """Stops the accounting process (a job in flight is dropped; the close recomputes)."""
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            process.shutdown(wait=True, cancel_futures=True)

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
                self._account_elsewhere(plan, total_iteration, rounds_done)
                # Served from what the process handed back (or computed here without one).
                dp_budget.after_rounds(plan, total_iteration, rounds_done)
            except Exception:  # the close repeats the question and reports the error
                _LOG.exception("accounting ahead of round %d failed", rounds_done)
            finally:
                self._jobs.task_done()

    def _account_elsewhere(
        self, plan: plan_pb2.ServerPlan, total_iteration: int, rounds_done: int
    ) -> None:
        setup = dp_budget.dp_setup(plan)
        if not self._own_process or setup is None or setup.dp_type not in accounting.GAUSSIAN_TYPES:
            return  # the tree types' RDP accounting is cheap

        def compute() -> dict[int, float]:
            job = self._executor().submit(
                account_in_process, plan.SerializeToString(), total_iteration, rounds_done
            )
            try:
                return job.result()
            except concurrent.futures.CancelledError:
                return {}  # closed meanwhile
            except BrokenProcessPool:
                _LOG.warning("the accounting process stopped; accounting in the worker instead")
                self._own_process = False
                self.close()
                return {}

        accounting.learn_pld_epsilons(setup, compute)

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._process is None:
                self._process = concurrent.futures.ProcessPoolExecutor(
                    1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=os.nice,
                    initargs=(ACCOUNTING_NICENESS,),
                )
            return self._process
