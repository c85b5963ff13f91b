"""Test-only crash points: the process SIGKILLs itself the N-th time it passes a named point.

Crash-recovery tests (tests/integration/reliability) need to kill the web server or the worker
inside windows a few microseconds wide: between a check-in's INSERT and its COMMIT, between an
update's blob write and the transaction that counts it, between a round's checkpoint write and
the commit that completes the round. A timer cannot hit those windows on purpose, so the code
marks them with `hit("name")` and a test process arms some of them through the environment:

    FCP_FAULT_POINT=upload.after_blob_write:2,close.after_claim:1
    FCP_FAULT_LOG=/path/to/file     (optional: one "name pid" line is appended before dying)

`name:N` kills the process with SIGKILL (no cleanup, no `finally`, no atexit, exactly like the
kernel's OOM killer or a lost machine) the N-th time this process reaches the point. Counts
are per process: each gunicorn worker counts its own passes. Production never sets the
variable; `hit` is then a single `is None` test.
"""

import dataclasses
import os
import signal
import threading
from collections.abc import Mapping
from typing import Final

ENV: Final = "FCP_FAULT_POINT"
LOG_ENV: Final = "FCP_FAULT_LOG"

# Every point the server marks; a spec naming anything else is a typo and is refused.
POINTS: Final = frozenset(
    {
        "checkin.before_commit",  # assignment inserted and slot taken, not committed
        "checkin.after_commit",  # committed, the device has not received its assignment
        "report.after_commit",  # LOCAL_COMPLETED committed, no upload instruction sent
        "upload.after_blob_write",  # update blob stored, not yet counted in the database
        "upload.after_commit",  # update counted, the device has not received its 204
        "close.after_claim",  # round APPLYING under this worker's claim
        "close.after_compute",  # noised result computed in memory only
        "close.after_stage",  # result staged (see round_outputs), nothing published
        "close.after_server_checkpoint",  # server checkpoint published, client one not
        "close.after_client_checkpoint",  # both checkpoints published, metrics not
        "close.after_metrics",  # every output published, the round not committed
        "close.after_commit",  # round COMPLETED and the next one started
        "blob.partial_write",  # a blob's temporary file holds only its header
        "db.commit",  # just before any transaction's COMMIT is sent
    }
)


def parse(spec: str) -> dict[str, int]:
    """Parses `name:N[,name:N...]` into {name: N}.

    Raises:
        ValueError: A name is unknown, a count is not a positive integer, or a name repeats.
    """
    targets: dict[str, int] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, count = item.partition(":")
        if not sep or name not in POINTS:
            raise ValueError(f"{ENV}: {item!r} is not <point>:<count> with a known point")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV}: the count in {item!r} must be a positive integer")
        if name in targets:
            raise ValueError(f"{ENV}: point {name!r} is armed twice")
        targets[name] = int(count)
    return targets


@dataclasses.dataclass
class FaultPlan:
    """The armed points of this process and how often each has been passed."""

    # Point name -> the pass that kills the process.
    targets: dict[str, int]
    # File that gets a "name pid" line just before the kill, so a test knows what fired.
    log_path: str | None = None
    # Point name -> passes so far (threads of one gunicorn worker share the count).
    passes: dict[str, int] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "FaultPlan | None":
        """The plan `env` arms, or None when no point is armed (always in production)."""
        targets = parse(env.get(ENV, ""))
        if not targets:
            return None
        return cls(targets=targets, log_path=env.get(LOG_ENV) or None)

    def passed(self, name: str) -> bool:
        """Counts one pass of `name`; True when this pass is the armed one."""
        target = self.targets.get(name)
        if target is None:
            return False
        with self.lock:
            count = self.passes.get(name, 0) + 1
            self.passes[name] = count
        return count == target


def _die(plan: FaultPlan, name: str) -> None:
    if plan.log_path:
        fd = os.open(plan.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{name} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


# Read once when the process imports the server; a fork (gunicorn) inherits a fresh copy
# because points are only ever passed after the workers have started.
_PLAN: Final = FaultPlan.from_env(os.environ)


def armed() -> bool:
    """Whether any point is armed in this process."""
    return _PLAN is not None


def hit(name: str) -> None:
    """Marks a crash window; kills the process here if this pass of `name` is armed."""
    if _PLAN is not None and _PLAN.passed(name):
        _die(_PLAN, name)
