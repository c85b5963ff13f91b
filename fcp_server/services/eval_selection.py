"""Which training result an evaluation round evaluates: ODP's checkpoint selectors, newest first.

ODP's scheduler (`TaskSchedulerCoreHelper.buildIterationInfo`; odp-federated-compute.md
section 2.9) takes the training task's COMPLETED iterations, buckets them, keeps the first
(MIN) result of each bucket and draws one of those candidates uniformly at random:

* `iteration_selector(k)` (`every_k_round`): bucket of result r is floor((r - 1) / k), so the
  candidates are results 1, k + 1, 2k + 1, ...;
* `duration_selector(h)` (`every_k_hour`): bucket of a result is floor(completion time in Unix
  seconds / (h * 3600)), so the candidates are the first results completed in each h-hour
  window.

Deliberate difference: instead of a random candidate this server takes the NEWEST candidate
not evaluated yet (newer than the last evaluated result), so the eval curve follows training
forward and never re-evaluates an older model; a candidate skipped while an eval round was
running is not revisited. The choice is stored in `Round.evaluated_result_id` and reported as
`server/eval/training_round`. Only COMPLETED training results (>= 1) are candidates, as in the
reference: the initial checkpoint is not evaluated.

Second deliberate difference: once the training task has COMPLETED, its final result is a
candidate too, whatever its bucket, so the released model always gets evaluated (with
every_5_round and 50 rounds the reference would stop at result 46).

Training rounds complete one after the other, so completion times grow with the result id
and the first result of the newest bucket is one MIN query away.
"""

import dataclasses
import datetime as dt

from google.protobuf import json_format
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from fcp_server.protos import task_pb2
from fcp_server.storage.models import Round, RoundStatus, Task, TaskStatus

# A selector wider than this is surely a mistake (ten years of hours / a million rounds).
MAX_SELECTOR_HOURS = 24 * 366 * 10
MAX_SELECTOR_ROUNDS = 1_000_000


@dataclasses.dataclass(frozen=True)
class CheckpointSelector:
    """Every `rounds` training rounds, or every `hours` hours of training (exactly one > 0)."""

    rounds: int = 0
    hours: int = 0

    def __post_init__(self) -> None:
        """Validates that exactly one period is set, within bounds."""
        if not 0 <= self.rounds <= MAX_SELECTOR_ROUNDS:
            raise ValueError(
                f"iteration_selector.size must be in 1..{MAX_SELECTOR_ROUNDS}, got {self.rounds}"
            )
        if not 0 <= self.hours <= MAX_SELECTOR_HOURS:
            raise ValueError(
                f"duration_selector.hours must be in 1..{MAX_SELECTOR_HOURS}, got {self.hours}"
            )
        if (self.rounds > 0) == (self.hours > 0):
            raise ValueError(f"set exactly one of rounds and hours, got {self}")


def selector_from_info(info: task_pb2.TaskInfo) -> CheckpointSelector:
    """Reads an eval task's selector; an unset one (or size 0) is the builder's every_1_round.

    Raises:
        ValueError: If a size or an hour count is negative or too large.
    """
    selector = info.evaluation_info.check_point_selector
    if selector.WhichOneof("selector_type") == "duration_selector":
        hours = selector.duration_selector.hours
        return CheckpointSelector(hours=hours) if hours else CheckpointSelector(rounds=1)
    return CheckpointSelector(rounds=selector.iteration_selector.size or 1)


def selector_of(task: Task) -> CheckpointSelector:
    """The selector stored in an eval task's row (its TaskInfo JSON, validated at creation)."""
    return selector_from_info(json_format.Parse(task.info_json, task_pb2.TaskInfo()))


def first_of_newest_round_bucket(latest: int, every: int) -> int | None:
    """Returns the first result of the k-round bucket holding `latest` (None before result 1).

    Results 1..k form bucket 0, k+1..2k bucket 1, and so on (ODP: floor((r - 1) / k)).
    """
    if latest < 1:
        return None
    return (latest - 1) // every * every + 1


def bucket_start(completed_at: dt.datetime, hours: int) -> dt.datetime:
    """Returns the start of the h-hour window (aligned to the Unix epoch) holding a time."""
    width = hours * 3600
    seconds = int(completed_at.timestamp()) // width * width
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def _completed(training: Task) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    return (Round.task_pk == training.id, Round.status == RoundStatus.COMPLETED)


def _first_of_newest_hour_bucket(session: Session, training: Task, hours: int) -> int | None:
    latest_done = session.scalar(
        select(Round.completed_at).where(
            *_completed(training), Round.iteration_id == training.completed_iterations
        )
    )
    if latest_done is None:
        return None
    start = bucket_start(latest_done, hours)
    return session.scalar(
        select(func.min(Round.iteration_id)).where(
            *_completed(training), Round.completed_at >= start
        )
    )


def select_training_result(
    session: Session,
    training: Task,
    selector: CheckpointSelector,
    last_evaluated: int | None,
) -> int | None:
    """Returns the training result the next eval round should evaluate, or None.

    Args:
        session: Open session.
        training: The training task whose results are evaluated.
        selector: The eval task's checkpoint selector.
        last_evaluated: The newest result an eval round of this task already evaluated.

    Returns:
        The newest candidate result above `last_evaluated` (the final result once training
        has COMPLETED), or None when there is none yet.
    """
    if training.completed_iterations < 1:
        return None
    if selector.rounds:
        candidate = first_of_newest_round_bucket(training.completed_iterations, selector.rounds)
    else:
        candidate = _first_of_newest_hour_bucket(session, training, selector.hours)
    if training.status == TaskStatus.COMPLETED:
        candidate = training.completed_iterations  # the released model (see module docstring)
    if candidate is None or (last_evaluated is not None and candidate <= last_evaluated):
        return None
    return candidate
