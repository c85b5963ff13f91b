from fcp_server.protos import task_builder_pb2 as _task_builder_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlanKind(_message.Message):
    __slots__ = ()
    class Enum(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[PlanKind.Enum]
        TRAINING: _ClassVar[PlanKind.Enum]
        EVALUATION: _ClassVar[PlanKind.Enum]
    UNKNOWN: PlanKind.Enum
    TRAINING: PlanKind.Enum
    EVALUATION: PlanKind.Enum
    def __init__(self) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "label")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    label: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("trainable", "non_trainable")
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    NON_TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    trainable: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    non_trainable: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, trainable: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., non_trainable: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class FeatureSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "input_name", "model_dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    input_name: str
    model_dtype: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., input_name: _Optional[str] = ..., model_dtype: _Optional[str] = ...) -> None: ...

class DataSpec(_message.Message):
    __slots__ = ("features", "label", "dict_features", "batch_size", "max_batches", "num_epochs", "example_selector_uri")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DICT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCHES_FIELD_NUMBER: _ClassVar[int]
    NUM_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_SELECTOR_URI_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureSpec]
    label: FeatureSpec
    dict_features: bool
    batch_size: int
    max_batches: int
    num_epochs: int
    example_selector_uri: str
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureSpec, _Mapping]]] = ..., label: _Optional[_Union[FeatureSpec, _Mapping]] = ..., dict_features: bool = ..., batch_size: _Optional[int] = ..., max_batches: _Optional[int] = ..., num_epochs: _Optional[int] = ..., example_selector_uri: _Optional[str] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("type", "learning_rate", "momentum", "beta_1", "beta_2", "epsilon")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    BETA_1_FIELD_NUMBER: _ClassVar[int]
    BETA_2_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    type: _task_builder_pb2.Optimizer.Enum
    learning_rate: float
    momentum: float
    beta_1: float
    beta_2: float
    epsilon: float
    def __init__(self, type: _Optional[_Union[_task_builder_pb2.Optimizer.Enum, str]] = ..., learning_rate: _Optional[float] = ..., momentum: _Optional[float] = ..., beta_1: _Optional[float] = ..., beta_2: _Optional[float] = ..., epsilon: _Optional[float] = ...) -> None: ...

class MetricSpec(_message.Message):
    __slots__ = ("name", "finalizer", "state", "thresholds", "max_state_per_example", "value_range")
    class Finalizer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FINALIZER_UNSPECIFIED: _ClassVar[MetricSpec.Finalizer]
        RATIO: _ClassVar[MetricSpec.Finalizer]
        SQRT_RATIO: _ClassVar[MetricSpec.Finalizer]
        PRECISION: _ClassVar[MetricSpec.Finalizer]
        RECALL: _ClassVar[MetricSpec.Finalizer]
        AUC_ROC: _ClassVar[MetricSpec.Finalizer]
        AUC_PR: _ClassVar[MetricSpec.Finalizer]
        SUM: _ClassVar[MetricSpec.Finalizer]
    FINALIZER_UNSPECIFIED: MetricSpec.Finalizer
    RATIO: MetricSpec.Finalizer
    SQRT_RATIO: MetricSpec.Finalizer
    PRECISION: MetricSpec.Finalizer
    RECALL: MetricSpec.Finalizer
    AUC_ROC: MetricSpec.Finalizer
    AUC_PR: MetricSpec.Finalizer
    SUM: MetricSpec.Finalizer
    class ValueRange(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VALUE_RANGE_UNSPECIFIED: _ClassVar[MetricSpec.ValueRange]
        NON_NEGATIVE: _ClassVar[MetricSpec.ValueRange]
        UNIT_INTERVAL: _ClassVar[MetricSpec.ValueRange]
    VALUE_RANGE_UNSPECIFIED: MetricSpec.ValueRange
    NON_NEGATIVE: MetricSpec.ValueRange
    UNIT_INTERVAL: MetricSpec.ValueRange
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINALIZER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    MAX_STATE_PER_EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    VALUE_RANGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    finalizer: MetricSpec.Finalizer
    state: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    thresholds: _containers.RepeatedScalarFieldContainer[float]
    max_state_per_example: float
    value_range: MetricSpec.ValueRange
    def __init__(self, name: _Optional[str] = ..., finalizer: _Optional[_Union[MetricSpec.Finalizer, str]] = ..., state: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., thresholds: _Optional[_Iterable[float]] = ..., max_state_per_example: _Optional[float] = ..., value_range: _Optional[_Union[MetricSpec.ValueRange, str]] = ...) -> None: ...

class ClientOnlyPlan(_message.Message):
    __slots__ = ("kind", "tflite_model", "data_spec", "model", "algorithm", "client_optimizer", "client_optimizer_state", "metrics", "train_signature", "eval_signature", "gradient_signature", "local_clip_norm", "flex_ops", "min_client_version")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TFLITE_MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_SPEC_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CLIENT_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    EVAL_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    FLEX_OPS_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    kind: PlanKind.Enum
    tflite_model: bytes
    data_spec: DataSpec
    model: ModelSpec
    algorithm: _task_builder_pb2.LearningAlgo.Enum
    client_optimizer: OptimizerSpec
    client_optimizer_state: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    metrics: _containers.RepeatedCompositeFieldContainer[MetricSpec]
    train_signature: str
    eval_signature: str
    gradient_signature: str
    local_clip_norm: float
    flex_ops: _containers.RepeatedScalarFieldContainer[str]
    min_client_version: str
    def __init__(self, kind: _Optional[_Union[PlanKind.Enum, str]] = ..., tflite_model: _Optional[bytes] = ..., data_spec: _Optional[_Union[DataSpec, _Mapping]] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., algorithm: _Optional[_Union[_task_builder_pb2.LearningAlgo.Enum, str]] = ..., client_optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., client_optimizer_state: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., metrics: _Optional[_Iterable[_Union[MetricSpec, _Mapping]]] = ..., train_signature: _Optional[str] = ..., eval_signature: _Optional[str] = ..., gradient_signature: _Optional[str] = ..., local_clip_norm: _Optional[float] = ..., flex_ops: _Optional[_Iterable[str]] = ..., min_client_version: _Optional[str] = ...) -> None: ...

class AggregationSpec(_message.Message):
    __slots__ = ("dp_type", "noise_multiplier", "clip_norm", "init_clip_norm", "target_unclipped_quantile", "clip_learning_rate", "clipped_count_stddev", "zeroing_norm", "dp_delta", "dp_target_epsilon", "population_size", "clients_per_round", "restart_warmup", "restart_frequency")
    DP_TYPE_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    INIT_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    TARGET_UNCLIPPED_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    CLIP_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_COUNT_STDDEV_FIELD_NUMBER: _ClassVar[int]
    ZEROING_NORM_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    DP_TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    POPULATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    RESTART_WARMUP_FIELD_NUMBER: _ClassVar[int]
    RESTART_FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    dp_type: _task_builder_pb2.DpAggregator.Enum
    noise_multiplier: float
    clip_norm: float
    init_clip_norm: float
    target_unclipped_quantile: float
    clip_learning_rate: float
    clipped_count_stddev: float
    zeroing_norm: float
    dp_delta: float
    dp_target_epsilon: float
    population_size: int
    clients_per_round: int
    restart_warmup: int
    restart_frequency: int
    def __init__(self, dp_type: _Optional[_Union[_task_builder_pb2.DpAggregator.Enum, str]] = ..., noise_multiplier: _Optional[float] = ..., clip_norm: _Optional[float] = ..., init_clip_norm: _Optional[float] = ..., target_unclipped_quantile: _Optional[float] = ..., clip_learning_rate: _Optional[float] = ..., clipped_count_stddev: _Optional[float] = ..., zeroing_norm: _Optional[float] = ..., dp_delta: _Optional[float] = ..., dp_target_epsilon: _Optional[float] = ..., population_size: _Optional[int] = ..., clients_per_round: _Optional[int] = ..., restart_warmup: _Optional[int] = ..., restart_frequency: _Optional[int] = ...) -> None: ...

class ServerPlan(_message.Message):
    __slots__ = ("kind", "model", "algorithm", "server_optimizer", "server_optimizer_state", "aggregation", "metrics", "num_rounds", "report_goal", "over_selection_rate", "round_deadline_seconds")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SERVER_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SERVER_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    REPORT_GOAL_FIELD_NUMBER: _ClassVar[int]
    OVER_SELECTION_RATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: PlanKind.Enum
    model: ModelSpec
    algorithm: _task_builder_pb2.LearningAlgo.Enum
    server_optimizer: OptimizerSpec
    server_optimizer_state: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    aggregation: AggregationSpec
    metrics: _containers.RepeatedCompositeFieldContainer[MetricSpec]
    num_rounds: int
    report_goal: int
    over_selection_rate: float
    round_deadline_seconds: int
    def __init__(self, kind: _Optional[_Union[PlanKind.Enum, str]] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., algorithm: _Optional[_Union[_task_builder_pb2.LearningAlgo.Enum, str]] = ..., server_optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., server_optimizer_state: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., aggregation: _Optional[_Union[AggregationSpec, _Mapping]] = ..., metrics: _Optional[_Iterable[_Union[MetricSpec, _Mapping]]] = ..., num_rounds: _Optional[int] = ..., report_goal: _Optional[int] = ..., over_selection_rate: _Optional[float] = ..., round_deadline_seconds: _Optional[int] = ...) -> None: ...
