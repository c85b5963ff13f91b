"""Value types that cross the aggregation stages: a device update and the server state.

They mirror TFF's `tff.learning.templates.LearningAlgorithmState` split (global model weights,
server optimizer state, aggregator state) so that a round close reads like TFF's `next_fn`,
and so the checkpoint codec (`fcp_server.checkpoints`) can store every part under its own
prefix (see the header of `fcp_server/protos/plan.proto`).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

Tensor: TypeAlias = NDArray[Any]
Tensors: TypeAlias = tuple[Tensor, ...]
# Metadata kept next to the tensors of a server checkpoint (JSON scalars only).
MetadataValue: TypeAlias = str | int | float | bool


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
    """One device's validated contribution to a training round.

    Attributes:
        trainable: `initial - trained` weights, one array per model trainable tensor, in the
            model's weight order (TFF's sign convention: the server optimizer treats it as a
            gradient).
        num_examples: How many examples the device trained on.
        metrics: Metric name -> that device's metric state tensors, in MetricSpec.state order.
        sum_of_squares: The trainable tensors' sum of squares as the server's own decoding
            computed it (`update_norms.sum_of_squares`, a by-product of the finiteness check),
            reused for clipping; None to compute it when aggregated. Never a device's claim.
        trainable_flat: When the decoder found all trainable tensors back to back with one
            dtype: one 1-D view over them (the same memory as `trainable`), else None.
        flat_order: The model positions of the tensors in `trainable_flat`, in its order.
    """

    trainable: Tensors
    num_examples: int
    metrics: Mapping[str, Tensors]
    sum_of_squares: float | None = None
    trainable_flat: Tensor | None = None
    flat_order: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelWeights:
    """The global model, as TFF's `ModelWeights(trainable, non_trainable)`."""

    trainable: Tensors
    non_trainable: Tensors


@dataclasses.dataclass(frozen=True)
class ServerState:
    """Everything a round needs to continue training; what a server checkpoint stores.

    Attributes:
        weights: The global model.
        optimizer_state: Server optimizer state by name (without the "server_optimizer/"
            checkpoint prefix), see `fcp_server.aggregation.optimizers`.
        aggregator_state: Aggregator (DP query) state by name (without the "aggregator/"
            prefix); empty for fixed clipping, the clip, quantile estimate and noise trees
            of the adaptive and tree aggregators.
        round_num: Rounds completed so far (0 for the initial state).
        metadata: Extra JSON scalars the caller wants stored with the checkpoint.
    """

    weights: ModelWeights
    optimizer_state: Mapping[str, Tensor]
    aggregator_state: Mapping[str, Tensor]
    round_num: int = 0
    metadata: Mapping[str, MetadataValue] = dataclasses.field(default_factory=dict)


def all_finite(tensors: Tensors) -> bool:
    """Returns True when no element of any floating tensor is NaN or infinite.

    Args:
        tensors: Arrays of any dtype; integer and boolean arrays are always finite.
    """
    return all(bool(np.all(np.isfinite(t))) for t in tensors if np.issubdtype(t.dtype, np.inexact))
