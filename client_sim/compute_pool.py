"""The fleet's TFLite compute processes, started and warmed up before any device wakes.

A spawned process needs seconds to import TensorFlow. The pool runs that import in every
process's initializer and only returns once all of them have finished it, so the first
round's devices do not wait for it and the fleet's time measures sessions, not start-up.

A job and the function that runs it are defined here, next to the pool, because a process
unpickling them imports their modules: this one needs only the plan runtime, so a compute
process never loads the devices' HTTP client (httpx and the session modules took ~50 ms of
CPU in each process's first job).
"""

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from client_sim import plan_runtime
from fcp_server.protos import plan_pb2

# The start-up barrier of this compute process (set by its initializer).
_READY: threading.Barrier | None = None
# How long a compute process waits for its siblings to start before giving up.
WARMUP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ComputeJob:
    """Everything a compute worker needs: the plan and ONLY this device's records."""

    device_id: str
    plan: bytes
    checkpoint: bytes
    records: tuple[bytes, ...]


def run_compute_job(job: ComputeJob) -> plan_runtime.PlanOutcome:
    """Executes one device's plan (the function the compute processes run)."""
    plan = plan_pb2.ClientOnlyPlan()
    plan.ParseFromString(job.plan)
    return plan_runtime.run_plan(plan, job.checkpoint, job.records)


def _init_process(ready: threading.Barrier) -> None:
    """Compute-process initializer: loads TFLite now, not on the first device's job."""
    global _READY
    _READY = ready
    plan_runtime.warm_up()


def _await_siblings() -> None:
    """A warm-up job: returns once every compute process has started and loaded TFLite."""
    assert _READY is not None
    _READY.wait(WARMUP_TIMEOUT_S)


def start(workers: int) -> ProcessPoolExecutor:
    """Spawns `workers` processes and returns once each one has loaded TFLite.

    Raises:
      threading.BrokenBarrierError: when a process did not start within the timeout.
    """
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(workers)
    executor = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_process, initargs=(ready,)
    )
    try:
        # One job per process: each blocks on the barrier until all processes hold one.
        for job in [executor.submit(_await_siblings) for _ in range(workers)]:
            job.result()
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    return executor
