"""Closes a training round: DP mean of the updates, server optimizer step, round metrics.

Reads top to bottom like the `next_fn` of TFF's `build_unweighted_fed_avg` (McMahan et al.
2017, arXiv 1602.05629; with DP, McMahan et al. 2018, arXiv 1710.17220):

    aggregate (query: noise + fixed denominator and the next aggregator state, or plain mean)
      -> finalizer (server optimizer; a non-finite aggregate is not applied, as TFF's
         `reject_non_finite_update`, and `update_non_finite` = 1)
      -> metrics (finalized client metrics, aggregator counts, DP facts).

Metric keys follow TFF's measurement tree flattened with "/": "server/client_work/train/<name>",
"server/aggregator/<name>", "server/finalizer/update_non_finite".
"""

import dataclasses
import logging

import numpy as np

from fcp_server.aggregation import metrics, optimizers, queries
from fcp_server.aggregation.accumulator import RoundAccumulator
from fcp_server.aggregation.state import ModelWeights, ServerState, Tensor, Tensors, all_finite
from fcp_server.protos import plan_pb2

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RoundOutcome:
    """The result of closing one round."""

    # The state to checkpoint and serve next (round_num incremented).
    new_state: ServerState
    # The (noised) mean update given to the server optimizer, in the weights' dtypes.
    mean_update: Tensors
    # Flat round metrics (see the module docstring for the keys).
    metrics: dict[str, float]


def apply_optimizer(
    optimizer: optimizers.ServerOptimizer,
    state: ServerState,
    update: Tensors,
) -> tuple[dict[str, Tensor], Tensors, bool]:
    """Applies the mean update unless it has a NaN/Inf (TFF `reject_non_finite_update`).

    Args:
        optimizer: The plan's server optimizer.
        state: The current server state.
        update: The mean update, in the trainable weights' dtypes.

    Returns:
        (optimizer state, trainable weights, whether the update was rejected as non-finite);
        on rejection the optimizer state and weights are the old ones.
    """
    if not all_finite(update):
        return dict(state.optimizer_state), state.weights.trainable, True
    new_opt_state, trainable = optimizer.next(
        state.optimizer_state, state.weights.trainable, update
    )
    return new_opt_state, trainable, False


def finalize_round(
    acc: RoundAccumulator,
    server_state: ServerState,
    plan: plan_pb2.ServerPlan,
    rng: np.random.Generator,
) -> RoundOutcome:
    """Turns the round's accumulated updates into the next server state and its metrics.

    Args:
        acc: The round's accumulator, built from the same `plan`, with every update added.
        server_state: The state the round's devices trained from.
        plan: The task's server plan.
        rng: DP noise source; `gaussian_noise.make_noise_rng()` in production, seeded only in tests;
            the one given to `acc.start_noise` if the noise was started early.

    Returns:
        The new state, the applied mean update and the round metrics.

    Raises:
        ValueError: If no update was added, or the state does not fit the plan's model.
    """
    if plan.kind == plan_pb2.PlanKind.EVALUATION:
        raise ValueError("An EVALUATION plan has no model update; use finalize_evaluation.")
    weights = server_state.weights.trainable
    total = acc.update_sum_view()
    _check_same_shapes(total, weights)
    expected = plan.aggregation.clients_per_round
    dp_query = not isinstance(acc.query, queries.UnweightedMeanQuery)
    if dp_query and acc.num_updates != expected:
        # The noise is calibrated for `clients_per_round` records; fewer dilute the signal.
        _LOG.warning("Aggregating %d updates, the plan expects %d.", acc.num_updates, expected)
    # 1. Aggregate: noise and the fixed denominator (plus the next aggregator state), or the
    #    plain mean.
    result = acc.query.finalize(
        total,
        acc.num_updates,
        rng,
        below_threshold=acc.below_threshold(),
        normals=acc.prefetched_noise(),
    )
    with np.errstate(over="ignore"):  # An overflow becomes inf and is rejected below.
        mean_update = tuple(
            m.astype(w.dtype, copy=False) for m, w in zip(result.mean, weights, strict=True)
        )
    # 2. Finalizer: server optimizer step, unless the aggregate is not finite.
    optimizer = optimizers.build_server_optimizer(plan.server_optimizer)
    opt_state, trainable, rejected = apply_optimizer(optimizer, server_state, mean_update)
    new_state = ServerState(
        weights=ModelWeights(trainable, server_state.weights.non_trainable),
        optimizer_state=opt_state,
        aggregator_state=result.state,
        round_num=server_state.round_num + 1,
        metadata=dict(server_state.metadata),
    )
    # 3. Metrics.
    round_metrics = _client_metrics(acc, plan)
    round_metrics.update({f"server/aggregator/{k}": v for k, v in result.metrics.items()})
    round_metrics.update(
        {
            "server/aggregator/num_clients": float(acc.num_updates),
            "server/aggregator/clipped_count": float(acc.clipped_count),
            "server/aggregator/non_finite_count": float(acc.non_finite_count),
            "server/aggregator/zeroed_count": float(acc.zeroed_count),
            "server/finalizer/update_non_finite": float(rejected),
        }
    )
    return RoundOutcome(new_state=new_state, mean_update=mean_update, metrics=round_metrics)


def finalize_evaluation(acc: RoundAccumulator, plan: plan_pb2.ServerPlan) -> dict[str, float]:
    """Returns the finalized metrics of an evaluation round (TFF `build_fed_eval`).

    Args:
        acc: The round's accumulator, built from the same EVALUATION `plan`.
        plan: The evaluation task's server plan.

    Raises:
        ValueError: If the plan is not an evaluation plan or no device reported.
    """
    if plan.kind != plan_pb2.PlanKind.EVALUATION:
        raise ValueError("finalize_evaluation needs an EVALUATION plan.")
    if acc.num_updates == 0:
        raise ValueError("Cannot finalize an evaluation round without any report.")
    values = _client_metrics(acc, plan, "server/client_work/eval/")
    values["server/aggregator/num_clients"] = float(acc.num_updates)
    return values


def _client_metrics(
    acc: RoundAccumulator, plan: plan_pb2.ServerPlan, prefix: str = "server/client_work/train/"
) -> dict[str, float]:
    sums = acc.metric_sums()
    values = {prefix + m.name: metrics.finalize_metric(m, sums[m.name]) for m in plan.metrics}
    values.setdefault(prefix + "num_examples", float(acc.num_examples))
    return values


def _check_same_shapes(update: Tensors, weights: Tensors) -> None:
    if [u.shape for u in update] != [w.shape for w in weights]:
        raise ValueError(
            "The server state's trainable weights do not have the plan's shapes: "
            f"{[w.shape for w in weights]} vs {[u.shape for u in update]}."
        )
