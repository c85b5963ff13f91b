"""Turns a device's examples into the batches a plan's DataSpec asks for.

TFF semantics (the reference builds `dataset.batch(batch_size).take(max_batches)` and the
client work iterates that dataset once per epoch): each epoch walks the device's examples in
stored order, cuts consecutive batches of `batch_size` with the last partial batch kept
(`drop_remainder=False`), and keeps the first `max_batches` of them (-1 keeps all).
"""

from dataclasses import dataclass

from fcp_server.protos import plan_pb2

# Bounds that keep a malformed plan from asking a device for unbounded work.
MAX_BATCH_SIZE = 1 << 16
MAX_EPOCHS = 1000


@dataclass(frozen=True)
class BatchPlan:
    """Validated batching parameters of a DataSpec."""

    # Examples per batch (> 0).
    batch_size: int
    # Batches kept per epoch; -1 keeps all.
    max_batches: int
    # Passes over the device's data (>= 1).
    num_epochs: int


def batch_plan(spec: plan_pb2.DataSpec) -> BatchPlan:
    """Validates a DataSpec's batching fields (0 epochs means the TFF default of 1).

    Raises:
      ValueError: for a non-positive batch size, max_batches < -1 or 0, or too many epochs.
    """
    if not 0 < spec.batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"DataSpec.batch_size must be in [1, {MAX_BATCH_SIZE}]: {spec.batch_size}")
    if spec.max_batches == 0 or spec.max_batches < -1:
        raise ValueError(f"DataSpec.max_batches must be -1 or positive: {spec.max_batches}")
    epochs = spec.num_epochs or 1
    if not 0 < epochs <= MAX_EPOCHS:
        raise ValueError(f"DataSpec.num_epochs must be in [1, {MAX_EPOCHS}]: {spec.num_epochs}")
    return BatchPlan(int(spec.batch_size), int(spec.max_batches), int(epochs))


def batch_slices(num_examples: int, plan: BatchPlan) -> list[tuple[int, int]]:
    """Returns the [start, stop) example ranges of every batch, over all epochs, in order.

    Args:
      num_examples: how many examples the device holds (>= 0).
      plan: the validated batching parameters.

    Returns:
      One (start, stop) pair per batch the device trains on; empty when it has no examples.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0: {num_examples}")
    per_epoch = [
        (start, min(start + plan.batch_size, num_examples))
        for start in range(0, num_examples, plan.batch_size)
    ]
    if plan.max_batches != -1:
        per_epoch = per_epoch[: plan.max_batches]
    return per_epoch * plan.num_epochs


def examples_used(num_examples: int, plan: BatchPlan) -> int:
    """Counts example visits over all epochs (TFF's num_examples client output)."""
    return sum(stop - start for start, stop in batch_slices(num_examples, plan))
