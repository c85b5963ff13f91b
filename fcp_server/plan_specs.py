"""The checkpoint keys, shapes and dtypes a server plan fixes for models and device updates.

Names follow the layout in the header of `fcp_server/protos/plan.proto`: model tensors are
"trainable/<i>" / "non_trainable/<i>" by position, a device update adds "num_examples" and
"metric/<metric>/<k>". `checkpoints` and `update_codec` check blobs against these specs.
"""

from typing import Any

import numpy as np

from fcp_server.protos import plan_pb2
from fcp_server.safetensors_codec import SUPPORTED_DTYPES

NUM_EXAMPLES = "num_examples"

Spec = tuple[tuple[int, ...], np.dtype[Any]]


def tensor_dtype(spec: plan_pb2.TensorSpec) -> np.dtype[Any]:
    """Returns a plan tensor's numpy dtype; raises ValueError if blobs cannot hold it."""
    if spec.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Plan tensor {spec.name!r} has an unsupported dtype {spec.dtype!r}.")
    return np.dtype(spec.dtype)


def tensor_shape(spec: plan_pb2.TensorSpec) -> tuple[int, ...]:
    """Returns a plan tensor's shape; raises ValueError if a dimension is unknown."""
    if any(d < 0 for d in spec.shape):
        raise ValueError(f"Plan tensor {spec.name!r} has an unknown dimension {list(spec.shape)}.")
    return tuple(spec.shape)


def model_specs(model: plan_pb2.ModelSpec) -> dict[str, Spec]:
    """Returns checkpoint key -> (shape, dtype) of the model tensors, by position."""
    specs = {
        f"trainable/{i}": (tensor_shape(t), tensor_dtype(t)) for i, t in enumerate(model.trainable)
    }
    for i, t in enumerate(model.non_trainable):
        specs[f"non_trainable/{i}"] = (tensor_shape(t), tensor_dtype(t))
    return specs


def update_specs(plan: plan_pb2.ServerPlan) -> dict[str, Spec]:
    """Returns key -> (shape, dtype) of every tensor a device update must hold.

    An EVALUATION plan's devices report num_examples and metric state only.
    """
    specs = {
        f"trainable/{i}": (tensor_shape(t), tensor_dtype(t))
        for i, t in enumerate(plan.model.trainable)
    }
    if plan.kind == plan_pb2.PlanKind.EVALUATION:
        specs = {}
    specs[NUM_EXAMPLES] = ((), np.dtype(np.int64))
    for metric in plan.metrics:
        for k, t in enumerate(metric.state):
            specs[f"metric/{metric.name}/{k}"] = (tensor_shape(t), tensor_dtype(t))
    return specs
