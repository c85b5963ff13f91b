"""Round close: claim an AGGREGATING round, aggregate its updates, publish outputs, advance.

The stages, each its own step so a crash anywhere leaves a recoverable state:

1. claim   AGGREGATING -> APPLYING by compare-and-swap, `apply_attempts` += 1 (the claim);
           exactly one process wins (the reference used a lock service; the CAS is enough);
2. compute stream the round's report_goal accepted updates one at a time from the blob store
           into `RoundAccumulator` (memory independent of the number of devices), then
           `finalize_round` (noise from an OS-seeded generator, fixed denominator, server
           optimizer) - TFF's `build_unweighted_fed_avg` next_fn, McMahan et al. 2017/2018;
3. publish the server checkpoint, client checkpoint and flat JSON metrics at the ODP paths,
           before the round is marked COMPLETED, so a COMPLETED round always has outputs;
4. commit  APPLYING -> COMPLETED (only for the same claim), metric rows, epsilon spent, and the
           next round or the end of the task (rounds done or DP budget).

Evaluation rounds sum and finalize the devices' metric state only (TFF `build_fed_eval`) and
record which training round they evaluated. Expected failures (bad blob, bad plan) release
the claim for a bounded number of retries (`rounds.fail_apply`); a crashed worker's claim is
recovered by `maintenance.recover_stale_applies`.
"""

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable

import numpy as np
from sqlalchemy import select

from fcp_server import checkpoints
from fcp_server.aggregation import (
    RoundAccumulator,
    ServerState,
    UnsupportedAggregation,
    finalize_evaluation,
    finalize_round,
)
from fcp_server.clock import Clock
from fcp_server.observability import ServerMetrics
from fcp_server.protos import plan_pb2
from fcp_server.services import blob_paths, dp_budget, eval_rounds, rounds, uploads
from fcp_server.services.plan_cache import PlanCache
from fcp_server.settings import ServerSettings
from fcp_server.storage import transitions
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

_LOG = logging.getLogger(__name__)
# Failures of a round's own data or plan: retried a bounded number of times, then FAILED.
_EXPECTED_ERRORS = (checkpoints.CheckpointError, BlobStoreError, UnsupportedAggregation, ValueError)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a closed round publishes."""

    server_checkpoint: bytes | None
    client_checkpoint: bytes | None
    metrics: dict[str, float]
    budget_exhausted: bool
    epsilon: float | None


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
    with deps.database.sessions() as session:
        return list(
            session.scalars(
                select(Assignment.id)
                .where(
                    Assignment.round_pk == rnd.id,
                    Assignment.status == AssignmentStatus.UPLOAD_COMPLETED,
                )
                .order_by(Assignment.status_changed_at, Assignment.id)
                .limit(rnd.report_goal)
            )
        )


def _updates(deps: Deps, rnd: Round) -> list[str]:
    ids = _update_ids(deps, rnd)
    if len(ids) != rnd.report_goal:
        raise ValueError(f"round has {len(ids)} uploaded updates, expected {rnd.report_goal}")
    return ids


def _decode(
    deps: Deps, task: Task, rnd: Round, plan: plan_pb2.ServerPlan, assignment_id: str
) -> checkpoints.ClientUpdate:
    limit = deps.settings.max_upload_bytes
    name = blob_paths.gradient_blob(
        task.population_name, task.task_id, rnd.iteration_id, assignment_id
    )
    data = deps.blobs.get(name, max_bytes=limit)
    return checkpoints.decode_update(data, uploads.update_plan(plan, task.kind), max_bytes=limit)


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
    for assignment_id in _updates(deps, rnd):
        acc.add(_decode(deps, task, rnd, plan, assignment_id))  # one update in memory at a time
    outcome = finalize_round(acc, state, plan, deps.rng_factory())
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
    for assignment_id in _updates(deps, rnd):
        acc.add(_decode(deps, task, rnd, plan, assignment_id))
    values = finalize_evaluation(acc, plan)
    if rnd.evaluated_result_id is not None:
        # Which training round's model these metrics describe (see `eval_selection`).
        values["server/eval/training_round"] = float(rnd.evaluated_result_id)
        # The same value under its earlier name, for readers of older metrics files.
        values["server/eval/training_result_id"] = float(rnd.evaluated_result_id)
    return Outputs(None, None, values, budget_exhausted=False, epsilon=None)


def _metrics_json(values: dict[str, float]) -> bytes:
    finite = {k: v for k, v in sorted(values.items()) if math.isfinite(v)}
    return json.dumps(finite, sort_keys=True).encode()


def _still_claimed(deps: Deps, round_pk: int, claim: int) -> bool:
    with deps.database.sessions() as session:
        row = session.execute(
            select(Round.status, Round.apply_attempts).where(Round.id == round_pk)
        ).one()
    return (row.status, row.apply_attempts) == (RoundStatus.APPLYING, claim)


def _publish(deps: Deps, task: Task, rnd: Round, out: Outputs) -> str | None:
    pop, tid, n = task.population_name, task.task_id, rnd.iteration_id
    digest = None
    if out.server_checkpoint is not None and out.client_checkpoint is not None:
        deps.blobs.put(blob_paths.server_checkpoint_blob(pop, tid, n), out.server_checkpoint)
        deps.blobs.put(
            blob_paths.client_checkpoint_blob(pop, tid, n), out.client_checkpoint, gzip=True
        )
        digest = hashlib.sha256(out.client_checkpoint).hexdigest()
    deps.blobs.put(
        blob_paths.metrics_blob(pop, tid, n),
        _metrics_json(out.metrics),
        content_type="application/json",
    )
    return digest


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
    try:
        plan = deps.plans.server_plan(deps.blobs, task, deps.settings.max_artifact_bytes)
        compute = _train if task.kind == TaskKind.TRAINING else _evaluate
        out = compute(deps, task, rnd, plan)
    except _EXPECTED_ERRORS as e:
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
    if not _still_claimed(deps, rnd.id, claim):
        _LOG.warning("round %s claim %d was taken over; outputs not published", rnd.id, claim)
        return False
    digest = _publish(deps, task, rnd, out)
    done = _commit(deps, rnd, claim, out, digest)
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
    with deps.database.sessions() as session:
        return list(
            session.scalars(
                select(Round.id)
                .where(Round.status == RoundStatus.AGGREGATING)
                .order_by(Round.status_changed_at)
                .limit(limit)
            )
        )
