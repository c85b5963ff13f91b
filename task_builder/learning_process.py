"""Composes the TFF learning process a TaskConfig describes: the reference semantics.

Follows ODP's `learning_process_utils.compose_iterative_processes` (TFF 0.87 names):
`build_unweighted_fed_avg` or `build_fed_sgd` with `build_sgdm` / `build_adam` optimizers and a
`DifferentiallyPrivateFactory` aggregator with clients_per_round = the training report goal:
FIXED_GAUSSIAN `gaussian_fixed`, ADAPTIVE_GAUSSIAN `gaussian_adaptive`, TREE_AGGREGATION
`tree_aggregation` and ADAPTIVE_TREE `tree_adaptive`, the tree types inside
`zeroing_factory(100 x clip)` (DP-FTRL, arXiv 2211.06530). The plans and the FCP server must
reproduce this process; an equivalence test compares them.

Deliberate difference from ODP: without a DP aggregator FedSGD also averages client updates
uniformly (ODP's default would weight by examples), so "no DP aggregator" means one thing,
the plain unweighted mean the server plan's AggregationSpec documents.
"""

import dataclasses

import tensorflow as tf
import tensorflow_federated as tff

from fcp_server.protos import plan_pb2, task_builder_pb2
from task_builder import metric_specs, optimizer_math
from task_builder.errors import TaskConfigError

_Dp = task_builder_pb2.DpAggregator
_Algo = task_builder_pb2.LearningAlgo

DEFAULT_INIT_CLIP_NORM = 0.1
DEFAULT_TARGET_QUANTILE = 0.5
DEFAULT_CLIP_LEARNING_RATE = 0.2
ZEROING_MULTIPLIER = 100.0
TREE_RESTART_WARMUP = 128
TREE_RESTART_FREQUENCY = 1024


@dataclasses.dataclass(frozen=True)
class DpSettings:
    """The DP aggregator parameters, with ODP/TFF defaults for unset (0) fields."""

    dp_type: int
    noise_multiplier: float
    clip_norm: float  # fixed types: the clip; adaptive types: the initial clip
    clients_per_round: int
    target_unclipped_quantile: float
    clip_learning_rate: float
    clipped_count_stddev: float  # 0 for the fixed types

    @property
    def zeroing_norm(self) -> float:
        """L-inf zeroing threshold (tree types only; 0 = none)."""
        tree = self.dp_type in (_Dp.TREE_AGGREGATION, _Dp.ADAPTIVE_TREE)
        return ZEROING_MULTIPLIER * self.clip_norm if tree else 0.0


def dp_settings(config: task_builder_pb2.TaskConfig) -> DpSettings:
    """Reads the DP settings from a validated config.

    Raises:
        TaskConfigError: A value breaks a constraint TFF's factories enforce.
    """
    dp = config.differential_privacy
    dp_type = dp.type or _Dp.FIXED_GAUSSIAN
    clients = int(config.federated_learning.learning_process.runtime_config.report_goal)
    adaptive = dp_type in (_Dp.ADAPTIVE_GAUSSIAN, _Dp.ADAPTIVE_TREE)
    clip = (dp.init_clip_norm or DEFAULT_INIT_CLIP_NORM) if adaptive else dp.clip_norm
    if clients < 1:
        raise TaskConfigError("clients_per_round (the training report_goal) must be >= 1")
    if not clip > 0 or dp.noise_multiplier < 0:
        raise TaskConfigError(
            f"DP needs clip > 0 and noise >= 0, got {clip}, {dp.noise_multiplier}"
        )
    stddev = 0.0
    if adaptive:
        stddev = dp.clipped_count_stddev or clients / 20.0
        # TFF: noise_multiplier must be < 2 x clipped_count_stddev (default: clients > 10 x z).
        if not dp.noise_multiplier < 2.0 * stddev:
            raise TaskConfigError(
                f"adaptive clipping needs noise_multiplier < 2 x clipped_count_stddev "
                f"({dp.noise_multiplier} >= 2 x {stddev}); with the default stddev the report "
                f"goal must exceed 10 x noise_multiplier"
            )
    return DpSettings(
        dp_type=dp_type,
        noise_multiplier=float(dp.noise_multiplier),
        clip_norm=float(clip),
        clients_per_round=clients,
        target_unclipped_quantile=float(dp.target_unclipped_quantile or DEFAULT_TARGET_QUANTILE),
        clip_learning_rate=float(dp.clip_learning_rate or DEFAULT_CLIP_LEARNING_RATE),
        clipped_count_stddev=float(stddev),
    )


def build_dp_aggregator(
    settings: DpSettings, record_specs: tuple[tf.TensorSpec, ...]
) -> tff.aggregators.UnweightedAggregationFactory:
    """The DifferentiallyPrivateFactory the settings describe (floats: TFF type-checks them)."""
    factory = tff.aggregators.DifferentiallyPrivateFactory
    z, m, clip = settings.noise_multiplier, float(settings.clients_per_round), settings.clip_norm
    if settings.dp_type == _Dp.FIXED_GAUSSIAN:
        return factory.gaussian_fixed(noise_multiplier=z, clients_per_round=m, clip=clip)
    if settings.dp_type == _Dp.ADAPTIVE_GAUSSIAN:
        return factory.gaussian_adaptive(
            noise_multiplier=z,
            clients_per_round=m,
            initial_l2_norm_clip=clip,
            target_unclipped_quantile=settings.target_unclipped_quantile,
            learning_rate=settings.clip_learning_rate,
            clipped_count_stddev=settings.clipped_count_stddev,
        )
    if settings.dp_type == _Dp.TREE_AGGREGATION:
        inner = factory.tree_aggregation(
            noise_multiplier=z, clients_per_round=m, l2_norm_clip=clip, record_specs=record_specs
        )
    elif settings.dp_type == _Dp.ADAPTIVE_TREE:
        inner = factory.tree_adaptive(
            noise_multiplier=z,
            clients_per_round=m,
            record_specs=record_specs,
            initial_l2_norm_clip=clip,
            restart_warmup=TREE_RESTART_WARMUP,
            restart_frequency=TREE_RESTART_FREQUENCY,
            target_unclipped_quantile=settings.target_unclipped_quantile,
            clip_learning_rate=settings.clip_learning_rate,
            clipped_count_stddev=settings.clipped_count_stddev,
        )
    else:
        raise TaskConfigError(f"unknown DP aggregator type {settings.dp_type}")
    return tff.aggregators.zeroing_factory(settings.zeroing_norm, inner)


def client_optimizer_spec(config: task_builder_pb2.TaskConfig) -> plan_pb2.OptimizerSpec:
    """The client optimizer (the config has no client momentum: plain SGD or Adam)."""
    lp = config.federated_learning.learning_process
    try:
        return optimizer_math.optimizer_spec(lp.client_optimizer, lp.client_learning_rate)
    except ValueError as e:
        raise TaskConfigError(f"Invalid client optimizer: {e}") from e


def server_optimizer_spec(config: task_builder_pb2.TaskConfig) -> plan_pb2.OptimizerSpec:
    """The server optimizer (SGD with optional momentum, or Adam)."""
    lp = config.federated_learning.learning_process
    try:
        return optimizer_math.optimizer_spec(
            lp.server_optimizer, lp.server_learning_rate, lp.server_momentum
        )
    except ValueError as e:
        raise TaskConfigError(f"Invalid server optimizer: {e}") from e


def accepted_metric_names(config: task_builder_pb2.TaskConfig) -> list[str]:
    """The allowlisted metric names of the config, in order (unknown names are dropped)."""
    names = [m.name for m in config.federated_learning.learning_process.metrics]
    return metric_specs.split_metric_names(names)[0]


def _record_specs(model: tff.learning.models.FunctionalModel) -> tuple[tf.TensorSpec, ...]:
    # A tuple: the tree queries' record structure must match the update's (a tuple).
    return tuple(tf.TensorSpec(w.shape, tf.as_dtype(w.dtype)) for w in model.initial_weights[0])


def compose(
    model: tff.learning.models.FunctionalModel,
    config: task_builder_pb2.TaskConfig,
    *,
    skip_dp_aggregator: bool,
) -> tff.learning.templates.LearningProcess:
    """Builds the training process of a validated config.

    Args:
        model: The loaded model (metrics are installed here from the config).
        config: A validated, normalized TaskConfig.
        skip_dp_aggregator: Aggregate with a plain unweighted mean instead of DP.

    Returns:
        The TFF learning process the plans reproduce.

    Raises:
        TaskConfigError: The DP or optimizer settings cannot be built.
    """
    lp = config.federated_learning.learning_process
    model = metric_specs.with_metrics(model, accepted_metric_names(config))
    try:
        server_opt = optimizer_math.build_tff_optimizer(server_optimizer_spec(config))
        aggregator: tff.aggregators.UnweightedAggregationFactory = (
            tff.aggregators.UnweightedMeanFactory()
            if skip_dp_aggregator
            else build_dp_aggregator(dp_settings(config), _record_specs(model))
        )
        if lp.type == _Algo.FED_SGD:
            return tff.learning.algorithms.build_fed_sgd(
                model,
                server_optimizer_fn=server_opt,
                model_aggregator=tff.aggregators.as_weighted_aggregator(aggregator),
            )
        client_opt = optimizer_math.build_tff_optimizer(client_optimizer_spec(config))
        return tff.learning.algorithms.build_unweighted_fed_avg(
            model,
            client_optimizer_fn=client_opt,
            server_optimizer_fn=server_opt,
            model_aggregator=aggregator,
        )
    except (ValueError, TypeError) as e:
        raise TaskConfigError(
            f"Failed to build learning algorithm based on `learning_process` config: {e}"
        ) from e


def build_eval(
    model: tff.learning.models.FunctionalModel, config: task_builder_pb2.TaskConfig
) -> tff.learning.templates.LearningProcess:
    """The federated evaluation process (`tff.learning.algorithms.build_fed_eval`)."""
    model = metric_specs.with_metrics(model, accepted_metric_names(config))
    return tff.learning.algorithms.build_fed_eval(model)
