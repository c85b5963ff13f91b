"""The server half of a plan: aggregation (DP), server optimizer, rounds and metric specs.

Mirrors what ODP's Model Updater runs in the plan's apply step (DP noise, normalization by the
fixed clients_per_round = report goal, server optimizer; odp-federated-compute §2.10) and the
TFF aggregators `learning_process.compose` builds, so the FCP server can reproduce them.
Evaluation plans aggregate metric states only, without DP (as ODP/TFF evaluation).
"""

from collections.abc import Sequence

from fcp_server.protos import plan_pb2, task_builder_pb2
from task_builder import learning_process, optimizer_math

_Dp = task_builder_pb2.DpAggregator
_Kind = plan_pb2.PlanKind


def aggregation_spec(
    config: task_builder_pb2.TaskConfig, *, skip_dp_aggregator: bool
) -> plan_pb2.AggregationSpec:
    """The training AggregationSpec (dp_type UNKNOWN = plain unweighted mean)."""
    release = config.policies.model_release_policy
    spec = plan_pb2.AggregationSpec(
        dp_delta=release.dp_delta,
        dp_target_epsilon=release.dp_target_epsilon,
        population_size=config.differential_privacy.population_size,
        clients_per_round=config.federated_learning.learning_process.runtime_config.report_goal,
    )
    if skip_dp_aggregator:
        return spec
    dp = learning_process.dp_settings(config)
    spec.dp_type = dp.dp_type  # type: ignore[assignment]
    spec.noise_multiplier = dp.noise_multiplier
    spec.clip_norm = dp.clip_norm
    spec.zeroing_norm = dp.zeroing_norm
    if dp.dp_type in (_Dp.ADAPTIVE_GAUSSIAN, _Dp.ADAPTIVE_TREE):
        spec.init_clip_norm = dp.clip_norm
        spec.target_unclipped_quantile = dp.target_unclipped_quantile
        spec.clip_learning_rate = dp.clip_learning_rate
        spec.clipped_count_stddev = dp.clipped_count_stddev
    if dp.dp_type == _Dp.ADAPTIVE_TREE:
        spec.restart_warmup = learning_process.TREE_RESTART_WARMUP
        spec.restart_frequency = learning_process.TREE_RESTART_FREQUENCY
    return spec


def server_optimizer_state(
    spec: plan_pb2.OptimizerSpec, weight_shapes: Sequence[tuple[int, ...]]
) -> list[plan_pb2.TensorSpec]:
    """Checkpoint tensors `server_optimizer/<label>` of the server optimizer."""
    return [
        plan_pb2.TensorSpec(
            name=f"server_optimizer/{slot.label}", shape=list(slot.shape), dtype=slot.dtype
        )
        for slot in optimizer_math.state_slots(spec, weight_shapes)
    ]


def training_server_plan(
    config: task_builder_pb2.TaskConfig,
    *,
    model_spec: plan_pb2.ModelSpec,
    metrics: Sequence[plan_pb2.MetricSpec],
    skip_dp_aggregator: bool,
) -> plan_pb2.ServerPlan:
    """The ServerPlan of the training task."""
    lp = config.federated_learning.learning_process
    server_opt = learning_process.server_optimizer_spec(config)
    shapes = [tuple(t.shape) for t in model_spec.trainable]
    return plan_pb2.ServerPlan(
        kind=_Kind.TRAINING,
        model=model_spec,
        algorithm=lp.type or task_builder_pb2.LearningAlgo.FED_AVG,
        server_optimizer=server_opt,
        server_optimizer_state=server_optimizer_state(server_opt, shapes),
        aggregation=aggregation_spec(config, skip_dp_aggregator=skip_dp_aggregator),
        metrics=metrics,
        num_rounds=config.policies.model_release_policy.num_max_training_rounds,
        report_goal=lp.runtime_config.report_goal,
        over_selection_rate=lp.runtime_config.over_selection_rate,
        round_deadline_seconds=lp.runtime_config.round_deadline_seconds,
    )


def eval_server_plan(
    config: task_builder_pb2.TaskConfig,
    *,
    model_spec: plan_pb2.ModelSpec,
    metrics: Sequence[plan_pb2.MetricSpec],
) -> plan_pb2.ServerPlan:
    """The ServerPlan of the evaluation task: sum metric states, finalize, no model update."""
    ev = config.federated_learning.evaluation
    lp = config.federated_learning.learning_process
    return plan_pb2.ServerPlan(
        kind=_Kind.EVALUATION,
        model=model_spec,
        aggregation=plan_pb2.AggregationSpec(clients_per_round=ev.report_goal),
        metrics=metrics,
        num_rounds=config.policies.model_release_policy.num_max_training_rounds,
        report_goal=ev.report_goal,
        over_selection_rate=ev.over_selection_rate,
        round_deadline_seconds=lp.runtime_config.round_deadline_seconds,
    )
