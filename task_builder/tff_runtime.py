"""Ends the `worker_binary` processes that TFF's C++ execution context leaves behind.

TFF 0.87's default context spawns `tensorflow_federated/data/worker_binary`, which survives
the Python process as an orphan and keeps its inherited stdout open, so a pipeline waiting on
that stdout hangs. Every entry point that runs TFF computations calls `install_reaper()` so
that nothing it started outlives it.
"""

import atexit
import contextlib
import logging

import psutil

_LOG = logging.getLogger(__name__)
_WORKER_NAME = "worker_binary"
_installed = False


def _is_tff_worker(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        if proc.name().startswith(_WORKER_NAME):
            return True
        return any(_WORKER_NAME in part for part in proc.cmdline()[:1])
    return False


def reap_tff_workers(timeout: float = 5.0) -> int:
    """Terminates this process's TFF worker children; returns how many were ended."""
    workers = [p for p in psutil.Process().children(recursive=True) if _is_tff_worker(p)]
    for proc in workers:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(workers, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if workers:
        _LOG.debug("ended %d TFF worker process(es)", len(workers))
    return len(workers)


def install_reaper() -> None:
    """Registers `reap_tff_workers` to run when this interpreter exits (idempotent)."""
    global _installed
    if not _installed:
        atexit.register(reap_tff_workers)
        _installed = True
