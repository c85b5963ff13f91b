"""Helpers that run several real round closes for the adaptive and tree aggregator tests."""

from collections.abc import Sequence

import numpy as np

from fcp_server import checkpoints
from fcp_server.aggregation import fedavg, optimizers
from fcp_server.aggregation.accumulator import RoundAccumulator
from fcp_server.aggregation.state import ClientUpdate, ServerState
from fcp_server.protos import plan_pb2
from tests.unit.aggregation.plan_builders import (
    TRAINABLE_SHAPES,
    DpType,
    make_plan,
    make_update,
    random_weights,
)


def make_dp_plan(
    dp_type: DpType,
    *,
    noise_multiplier: float = 0.0,
    clients_per_round: int = 10,
    clip_norm: float = 1.0,
    init_clip_norm: float = 0.5,
    target_quantile: float = 0.5,
    clip_learning_rate: float = 0.2,
    clipped_count_stddev: float = 0.0,
    zeroing_norm: float = 0.0,
    restart_frequency: int = 0,
    restart_warmup: int = 0,
) -> plan_pb2.ServerPlan:
    """A linear-model plan with every AggregationSpec field of the adaptive/tree types."""
    plan = make_plan(
        dp_type=dp_type,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        clients_per_round=clients_per_round,
        zeroing_norm=zeroing_norm,
        with_metrics=False,
    )
    agg = plan.aggregation
    agg.init_clip_norm = init_clip_norm
    agg.target_unclipped_quantile = target_quantile
    agg.clip_learning_rate = clip_learning_rate
    agg.clipped_count_stddev = clipped_count_stddev
    agg.restart_frequency = restart_frequency
    agg.restart_warmup = restart_warmup
    return plan


# Every AggregationSpec.dp_type the server implements.
ALL_DP_TYPES = (
    DpType.FIXED_GAUSSIAN,
    DpType.ADAPTIVE_GAUSSIAN,
    DpType.TREE_AGGREGATION,
    DpType.ADAPTIVE_TREE,
    DpType.UNKNOWN,
)


def noisy_plan(
    dp_type: DpType, shapes: Sequence[tuple[int, ...]], clients_per_round: int
) -> plan_pb2.ServerPlan:
    """`make_dp_plan` with noise (z 0.8, count stddev 1) over float32 tensors of `shapes`."""
    plan = make_dp_plan(
        dp_type,
        noise_multiplier=0.8,
        clients_per_round=clients_per_round,
        clipped_count_stddev=1.0,
    )
    del plan.model.trainable[:]
    for i, shape in enumerate(shapes):
        plan.model.trainable.add(name=f"trainable/{i}", shape=list(shape), dtype="float32")
    return plan


def initial_state(plan: plan_pb2.ServerPlan, seed: int = 0) -> ServerState:
    """Random weights, zero optimizer state, empty aggregator state (a task's round 0)."""
    weights = random_weights(np.random.default_rng(seed))
    optimizer = optimizers.build_server_optimizer(plan.server_optimizer)
    return ServerState(weights, optimizer.initialize(weights.trainable), {}, round_num=0)


def random_updates(rng: np.random.Generator, count: int, scale: float = 1.0) -> list[ClientUpdate]:
    """Updates with log-normally spread norms (around `scale`), so some get clipped."""
    updates = []
    for _ in range(count):
        direction = [rng.normal(size=s) for s in TRAINABLE_SHAPES]
        norm = np.sqrt(sum(float(np.sum(d**2)) for d in direction))
        target = scale * float(np.exp(rng.normal(scale=0.8)))
        trainable = tuple((d * target / norm).astype(np.float32) for d in direction)
        updates.append(make_update(trainable, with_metrics=False))
    return updates


def close_round(
    plan: plan_pb2.ServerPlan,
    state: ServerState,
    updates: Sequence[ClientUpdate],
    rng: np.random.Generator,
) -> fedavg.RoundOutcome:
    """One round close exactly as the server runs it."""
    acc = RoundAccumulator(plan, state.aggregator_state)
    for update in updates:
        acc.add(update)
    return fedavg.finalize_round(acc, state, plan, rng)


def run_rounds(
    plan: plan_pb2.ServerPlan,
    rounds: Sequence[Sequence[ClientUpdate]],
    *,
    seed: int,
    checkpoint_after: int | None = None,
) -> list[fedavg.RoundOutcome]:
    """Runs the rounds with one generator per round (as the server seeds one per round).

    With `checkpoint_after`, the state is encoded to a server checkpoint and decoded again
    after that many rounds, as a restarted server would load it.
    """
    state = initial_state(plan)
    outcomes = []
    for index, updates in enumerate(rounds):
        if checkpoint_after is not None and index == checkpoint_after:
            blob = checkpoints.encode_server_checkpoint(state)
            state = checkpoints.decode_server_checkpoint(blob, plan)
        outcome = close_round(plan, state, updates, np.random.default_rng([seed, index]))
        outcomes.append(outcome)
        state = outcome.new_state
    return outcomes
