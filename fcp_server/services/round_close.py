"""Round close: claim an AGGREGATING round, aggregate its updates, publish outputs, advance.

The stages, each its own step so a crash anywhere leaves a recoverable state:

1. claim   AGGREGATING -> APPLYING by compare-and-swap, `apply_attempts` += 1 (the claim);
           exactly one process wins (the reference used a lock service; the CAS is enough);
2. compute stream the round's report_goal accepted updates one at a time from the blob store
           into `RoundAccumulator` (memory independent of the number of devices), then
           `finalize_round` (noise from an OS-seeded generator, fixed denominator, server
           optimizer) - TFF's `build_unweighted_fed_avg` next_fn, McMahan et al. 2017/2018;
           the result is staged once (`round_outputs`): a re-run of the close publishes the
           staged result, never a second, differently noised one;
3. publish the server checkpoint, client checkpoint and flat JSON metrics at the ODP paths,
           before the round is marked COMPLETED, so a COMPLETED round always has outputs;
4. commit  APPLYING -> COMPLETED (only for the same claim), metric rows, epsilon spent, and the
           next round or the end of the task (rounds done or DP budget).

Evaluation rounds sum and finalize the devices' metric state only (TFF `build_fed_eval`) and
record which training round they evaluated. Expected failures (bad blob, bad plan) release
the claim for a bounded number of retries (`rounds.fail_apply`); a crashed worker's claim is
recovered by `maintenance.recover_stale_applies`. An unavailable database or blob store
(`storage.availability`) releases the claim without counting the attempt
(`rounds.release_uncounted`), so the round resumes when the dependency returns.
"""

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
from sqlalchemy import select

from fcp_server import checkpoints, fault_points
from fcp_server.aggregation import (
    RoundAccumulator,
    ServerState,
    finalize_evaluation,
    finalize_round,
)
from fcp_server.clock import Clock
from fcp_server.observability import ServerMetrics
from fcp_server.protos import plan_pb2
from fcp_server.services import blob_paths, dp_budget, eval_rounds, round_outputs, rounds, uploads
from fcp_server.services.plan_cache import PlanCache
from fcp_server.services.round_outputs import Outputs
from fcp_server.settings import ServerSettings
from fcp_server.storage import availability, transitions
from fcp_server.storage.blobs import BlobStore, BlobStoreError
from fcp_server.storage.db import Database
from fcp_server.storage.models import (
    Assignment,
    AssignmentStatus,
    Round,
    RoundMetric,
    RoundStatus,
    Task,
    TaskKind,
)
from fcp_server.storage.read_buffers import ReadBuffer

_LOG = logging.getLogger(__name__)
# Failures of a round's own data or plan: retried a bounded number of times, then FAILED.
EXPECTED_ERRORS = (checkpoints.CheckpointError, BlobStoreError, ValueError)


class ClaimNotReleased(Exception):
    """A dependency outage interrupted a close, and the database refused the release too.

    The worker keeps (`round_pk`, `claim`) and retries `release` on its next ticks, so the
    round need not wait for the aggregation lease to expire.
    """

    def __init__(self, round_pk: int, claim: int) -> None:
        super().__init__(f"round {round_pk}: claim {claim} could not be released yet")
        self.round_pk = round_pk
        self.claim = claim


@dataclasses.dataclass(frozen=True)
class Deps:
    """Collaborators of the round close."""

    database: Database
    blobs: BlobStore
    clock: Clock
    settings: ServerSettings
    plans: PlanCache
    # The DP noise source: `aggregation.make_noise_rng` (OS-seeded) outside tests.
    rng_factory: Callable[[], np.random.Generator]
    metrics: ServerMetrics | None = None


def _claim(deps: Deps, round_pk: int) -> tuple[Round, Task, int] | None:
    now = deps.clock.now()
    with deps.database.sessions() as session, session.begin():
        rnd = session.get(Round, round_pk)
        if rnd is None or rnd.status != RoundStatus.AGGREGATING:
            return None
        claim = rnd.apply_attempts + 1
        if not transitions.move_round(
            session,
            rnd.id,
            RoundStatus.AGGREGATING,
            RoundStatus.APPLYING,
            now=now,
            reason=f"claim {claim}",
            apply_attempts=claim,
        ):
            return None
        session.refresh(rnd)
        task = session.get(Task, rnd.task_pk)
        assert task is not None  # foreign key
        return rnd, task, claim


def _update_ids(deps: Deps, rnd: Round) -> list[str]:
    """The round's first `report_goal` acknowledged uploads, in aggregation order.

    Which uploads count is decided by acknowledgement order. They are then added in the order
    of their contents' SHA-256: the float32 running sum depends on the order of its terms, and
    this way the aggregate is a function of the set of updates alone, not of the order they
    arrived in or of their random assignment ids (equal digests are equal bytes).
    """
    with deps.database.reads() as session:
        rows = session.execute(
            select(Assignment.id, Assignment.upload_sha256)
            .where(
                Assignment.round_pk == rnd.id,
                Assignment.status == AssignmentStatus.UPLOAD_COMPLETED,
            )
            .order_by(Assignment.status_changed_at, Assignment.id)
            .limit(rnd.report_goal)
        ).all()
    return [row.id for row in sorted(rows, key=lambda r: (r.upload_sha256 or "", r.id))]


def _updates(deps: Deps, rnd: Round) -> list[str]:
    ids = _update_ids(deps, rnd)
    if len(ids) != rnd.report_goal:
        raise ValueError(f"round has {len(ids)} uploaded updates, expected {rnd.report_goal}")
    return ids


def _layout(task: Task, plan: plan_pb2.ServerPlan) -> checkpoints.UpdateLayout:
    """What the round's updates must hold, read from the plan once for all of them."""
    return checkpoints.update_layout(uploads.update_plan(plan, task.kind))


def _add_updates(
    deps: Deps, task: Task, rnd: Round, plan: plan_pb2.ServerPlan, acc: RoundAccumulator
) -> None:
    """Reads, validates and adds the round's updates, one in memory at a time.

    Every update is read into the same buffer: `add` keeps no view of an update, so the next
    read may overwrite it.
    """
    layout = _layout(task, plan)
    limit = deps.settings.max_upload_bytes
    buffer = ReadBuffer()
    for assignment_id in _updates(deps, rnd):
        name = blob_paths.gradient_blob(
            task.population_name, task.task_id, rnd.iteration_id, assignment_id
        )
        data = deps.blobs.get_into(name, buffer, max_bytes=limit)
        acc.add(checkpoints.decode_update(data, layout, max_bytes=limit))


def _base_state(deps: Deps, task: Task, rnd: Round, plan: plan_pb2.ServerPlan) -> ServerState:
    pop, tid, limit = task.population_name, task.task_id, deps.settings.max_artifact_bytes
    if rnd.base_result_id == 0:
        data = deps.blobs.get(blob_paths.artifact_blob(pop, tid, "checkpoint"), max_bytes=limit)
        return checkpoints.initial_server_state(plan, data, max_bytes=limit)
    data = deps.blobs.get(
        blob_paths.server_checkpoint_blob(pop, tid, rnd.base_result_id), max_bytes=limit
    )
    return checkpoints.decode_server_checkpoint(data, plan, max_bytes=limit)


def _train(deps: Deps, task: Task, rnd: Round, plan: plan_pb2.ServerPlan) -> Outputs:
    state = _base_state(deps, task, rnd, plan)
    acc = RoundAccumulator(plan, state.aggregator_state)
    rng = deps.rng_factory()
    acc.start_noise(rng)  # drawn while the updates are read and summed
    _add_updates(deps, task, rnd, plan, acc)
    outcome = finalize_round(acc, state, plan, rng)
    # Training round N is the N-th aggregation (a retried attempt never aggregated).
    budget = dp_budget.after_rounds(plan, task.total_iteration, rnd.iteration_id)
    return Outputs(
        server_checkpoint=checkpoints.encode_server_checkpoint(outcome.new_state),
        client_checkpoint=checkpoints.encode_client_checkpoint(outcome.new_state.weights),
        metrics={**outcome.metrics, **budget.metrics},
        budget_exhausted=budget.exhausted,
        epsilon=budget.epsilon,
    )


def _evaluate(deps: Deps, task: Task, rnd: Round, plan: plan_pb2.ServerPlan) -> Outputs:
    acc = RoundAccumulator(plan)  # an EVALUATION plan: metric state only, no DP query
    _add_updates(deps, task, rnd, plan, acc)
    values = finalize_evaluation(acc, plan)
    if rnd.evaluated_result_id is not None:
        # Which training round's model these metrics describe (see `eval_selection`).
        values["server/eval/training_round"] = float(rnd.evaluated_result_id)
        # The same value under its earlier name, for readers of older metrics files.
        values["server/eval/training_result_id"] = float(rnd.evaluated_result_id)
    return Outputs(None, None, values, budget_exhausted=False, epsilon=None)


def _still_claimed(deps: Deps, round_pk: int, claim: int) -> bool:
    with deps.database.reads() as session:
        row = session.execute(
            select(Round.status, Round.apply_attempts).where(Round.id == round_pk)
        ).one()
    return (row.status, row.apply_attempts) == (RoundStatus.APPLYING, claim)


def _outputs(deps: Deps, task: Task, rnd: Round, claim: int) -> Outputs | None:
    """The round's staged outputs: an earlier run's if any, else computed and staged now."""
    staged = blob_paths.staged_outputs_blob(task.population_name, task.task_id, rnd.iteration_id)
    earlier = round_outputs.load_staged(deps.blobs, staged)
    if earlier is not None:
        _LOG.info("round %s claim %d republishes the staged outputs", rnd.id, claim)
        return earlier
    plan = deps.plans.server_plan(deps.blobs, task, deps.settings.max_artifact_bytes)
    compute = _train if task.kind == TaskKind.TRAINING else _evaluate
    out = compute(deps, task, rnd, plan)
    fault_points.hit("close.after_compute")
    if not _still_claimed(deps, rnd.id, claim):
        return None  # taken over: this run's noise is never written anywhere
    out = round_outputs.stage_once(deps.blobs, staged, out)
    fault_points.hit("close.after_stage")
    return out


def _commit(deps: Deps, rnd: Round, claim: int, out: Outputs, digest: str | None) -> bool:
    now = deps.clock.now()
    with deps.database.sessions() as session, session.begin():
        if not transitions.move_round(
            session,
            rnd.id,
            RoundStatus.APPLYING,
            RoundStatus.COMPLETED,
            now=now,
            apply_claim=claim,
            completed_at=now,
            aggregated_count=rnd.report_goal,
        ):
            return False
        session.add_all(
            RoundMetric(round_pk=rnd.id, name=k[:200], value=v)
            for k, v in out.metrics.items()
            if math.isfinite(v)
        )
        task = session.get(Task, rnd.task_pk)
        assert task is not None
        if out.epsilon is not None:
            task.epsilon_spent = out.epsilon
        rounds.advance_after_close(
            session=session,
            task=task,
            rnd=rnd,
            now=now,
            budget_exhausted=out.budget_exhausted,
            checkpoint_sha256=digest,
        )
        eval_rounds.after_round_closed(session=session, blobs=deps.blobs, task=task, now=now)
    return True


def close_round(deps: Deps, round_pk: int) -> bool:
    """Aggregates one AGGREGATING round end to end; False if not claimed or not completed."""
    claimed = _claim(deps, round_pk)
    if claimed is None:
        return False
    rnd, task, claim = claimed
    fault_points.hit("close.after_claim")
    try:
        return _finish(deps, rnd, task, claim)
    except availability.DEPENDENCY_ERRORS as e:
        _LOG.warning(
            "round %s aggregation attempt %d paused: the %s is unavailable (%s); retrying later",
            rnd.id,
            claim,
            availability.unavailable_dependency(e),
            e,
        )
        try:
            release(deps, rnd.id, claim, reason=str(e)[:500])
        except availability.DEPENDENCY_ERRORS as still_down:
            raise ClaimNotReleased(rnd.id, claim) from still_down
        return False


def release(deps: Deps, round_pk: int, claim: int, *, reason: str) -> bool:
    """Releases an interrupted claim without counting it (`rounds.release_uncounted`)."""
    with deps.database.sessions() as session, session.begin():
        return rounds.release_uncounted(
            session=session, round_pk=round_pk, claim=claim, now=deps.clock.now(), reason=reason
        )


def _finish(deps: Deps, rnd: Round, task: Task, claim: int) -> bool:
    try:
        out = _outputs(deps, task, rnd, claim)
    except availability.DEPENDENCY_ERRORS:
        raise  # an outage, not the round's fault: released uncounted by the caller
    except EXPECTED_ERRORS as e:  # StagedOutputsCorrupt is a ValueError
        _LOG.warning("round %s aggregation attempt %d failed: %s", rnd.id, claim, e)
        with deps.database.sessions() as session, session.begin():
            rounds.fail_apply(
                session=session,
                rnd=rnd,
                task=task,
                now=deps.clock.now(),
                settings=deps.settings,
                reason=str(e)[:500],
                claim=claim,
            )
        return False
    if out is None or not _still_claimed(deps, rnd.id, claim):
        _LOG.warning("round %s claim %d was taken over; outputs not published", rnd.id, claim)
        return False
    digest = round_outputs.publish(
        deps.blobs, (task.population_name, task.task_id, rnd.iteration_id), out
    )
    done = _commit(deps, rnd, claim, out, digest)
    fault_points.hit("close.after_commit")
    if done and deps.metrics is not None:
        elapsed = (deps.clock.now() - rnd.created_at).total_seconds()
        deps.metrics.round_duration.observe(max(elapsed, 0.0), task.population_name)
    if done:
        _LOG.info(
            "round %s (%s/%s #%d) completed with %d updates",
            rnd.id,
            task.population_name,
            task.task_id,
            rnd.iteration_id,
            rnd.report_goal,
        )
    return done


def aggregating_rounds(deps: Deps, limit: int = 10) -> list[int]:
    """Ids of rounds waiting for aggregation, oldest first."""
    with deps.database.reads() as session:
        return list(
            session.scalars(
                select(Round.id)
                .where(Round.status == RoundStatus.AGGREGATING)
                .order_by(Round.status_changed_at)
                .limit(limit)
            )
        )
