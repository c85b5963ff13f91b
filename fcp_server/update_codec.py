"""Device updates as safetensors: encoding, and decoding an upload against the plan's layout.

A device update holds "trainable/<i>" (initial - trained, by model position), "num_examples"
(an int64 scalar) and "metric/<metric>/<k>" (see the header of `fcp_server/protos/plan.proto`).
Uploads are untrusted: `decode_update` accepts exactly the tensors the plan expects, all finite,
with a bounded example count, and rejects anything else with `InvalidUpdate`.

Every update of a round is checked against one `UpdateLayout`, and nearly all of them carry
the same header bytes (the same encoder wrote the same tensors). A layout therefore remembers
the headers it has accepted, keyed by the exact header bytes and the blob's length (the
offsets were checked against that length): a header seen before is not parsed and checked
again, only its tensors are viewed and their values checked. When the trainable tensors lie
back to back in the data area with one dtype (the safetensors library writes tensors of one
dtype consecutively, ordered by name), the update also carries one flat view over them, so
the norm and the clipped add each make one pass over the update instead of one per tensor.
"""

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Final

import numpy as np

from fcp_server.aggregation import update_norms
from fcp_server.aggregation.state import ClientUpdate
from fcp_server.plan_specs import NUM_EXAMPLES, Spec, update_specs
from fcp_server.protos import plan_pb2
from fcp_server.safetensors_codec import (
    CheckpointError,
    TensorView,
    check_finite,
    check_tensors,
    encode_tensors,
    header_end,
    parse_header,
    tensor_views,
    view_array,
)

DEFAULT_MAX_NUM_EXAMPLES = 10_000_000
# A layout remembers at most this many accepted headers, each at most this long, so a stream
# of distinct (valid) headers cannot grow its memory: past the bound, headers are just parsed.
_MAX_REMEMBERED_HEADERS: Final = 16
_MAX_REMEMBERED_HEADER_BYTES: Final = 64 << 10


class InvalidUpdate(CheckpointError):
    """A device update is rejected; the message names the offending tensor."""


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How to view the tensors of a blob whose header a layout accepted."""

    views: tuple[TensorView, ...]
    # The floating tensors whose finiteness is checked on their own (not the trainable ones,
    # which are checked with their norm).
    finite_checked: tuple[str, ...]
    # All trainable tensors back to back (None when they are not), and the model positions
    # of the tensors in the order they lie in it.
    flat: TensorView | None
    flat_order: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class UpdateLayout:
    """The tensors a device update for one plan must hold, read from the plan once.

    `decode_update` takes it in place of the plan: all updates of a round are checked against
    the same layout, and reading it from the protobuf costs more than the checks themselves.
    """

    # Key -> (shape, dtype) of every tensor, as `update_specs` (read-only).
    specs: Mapping[str, Spec]
    # The trainable keys in model order (none for an EVALUATION plan).
    trainable: tuple[str, ...]
    # (metric name, its state keys in order) for each plan metric.
    metrics: tuple[tuple[str, tuple[str, ...]], ...]
    # (blob length, header bytes) -> how to view that blob's tensors; see the module docstring.
    accepted: dict[tuple[int, bytes], _Recipe] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )


def update_layout(plan: plan_pb2.ServerPlan) -> UpdateLayout:
    """Returns the layout `decode_update` checks the plan's updates against.

    Raises:
        ValueError: If a plan tensor has an unsupported dtype or an unknown dimension.
    """
    evaluation = plan.kind == plan_pb2.PlanKind.EVALUATION
    count = 0 if evaluation else len(plan.model.trainable)
    return UpdateLayout(
        specs=types.MappingProxyType(update_specs(plan)),
        trainable=tuple(f"trainable/{i}" for i in range(count)),
        metrics=tuple(
            (m.name, tuple(f"metric/{m.name}/{k}" for k in range(len(m.state))))
            for m in plan.metrics
        ),
    )


def decode_update(
    data: bytes | memoryview,
    plan: plan_pb2.ServerPlan | UpdateLayout,
    *,
    max_bytes: int,
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
) -> ClientUpdate:
    """Parses and validates one device update against the plan.

    Args:
        data: The uploaded (already decompressed) safetensors bytes. The arrays of the result
            are read-only views into it: a caller passing a mutable buffer must not change it
            while the update is in use.
        plan: The task's server plan, or its `update_layout` (for many updates of a plan).
        max_bytes: Largest accepted blob.
        max_num_examples: Largest accepted "num_examples".

    Raises:
        InvalidUpdate: If the blob is malformed, lacks or adds tensors, has a wrong
            shape/dtype, a NaN/Inf, or a num_examples out of [0, max_num_examples].
    """
    layout = plan if isinstance(plan, UpdateLayout) else update_layout(plan)
    recipe = _recipe(data, layout, max_bytes)
    tensors = {v.name: view_array(data, v) for v in recipe.views}
    for name in recipe.finite_checked:
        check_finite(name, tensors[name], InvalidUpdate)
    trainable = tuple(tensors[name] for name in layout.trainable)
    flat = None if recipe.flat is None else view_array(data, recipe.flat)
    # One pass gives the trainable tensors' finiteness and their sum of squares; the
    # aggregation then reuses that sum for clipping.
    sum_of_squares = update_norms.sum_of_squares(trainable if flat is None else (flat,))
    if math.isnan(sum_of_squares):
        for name, t in zip(layout.trainable, trainable, strict=True):
            check_finite(name, t, InvalidUpdate)
    num_examples = int(tensors[NUM_EXAMPLES])
    if not 0 <= num_examples <= max_num_examples:
        raise InvalidUpdate(
            f"Tensor 'num_examples' is {num_examples}, expected 0..{max_num_examples}."
        )
    return ClientUpdate(
        trainable=trainable,
        num_examples=num_examples,
        metrics={name: tuple(tensors[key] for key in keys) for name, keys in layout.metrics},
        sum_of_squares=sum_of_squares,
        trainable_flat=flat,
        flat_order=recipe.flat_order,
    )


def encode_update(update: ClientUpdate) -> bytes:
    """Serialises a device update in the plan.proto layout (used by devices and tests)."""
    tensors = {f"trainable/{i}": t for i, t in enumerate(update.trainable)}
    tensors[NUM_EXAMPLES] = np.array(update.num_examples, dtype=np.int64)
    for name, state in update.metrics.items():
        tensors.update({f"metric/{name}/{k}": t for k, t in enumerate(state)})
    return encode_tensors(tensors)


def _recipe(data: bytes | memoryview, layout: UpdateLayout, max_bytes: int) -> _Recipe:
    """The accepted header's recipe, checking (and remembering) a header not seen before."""
    try:
        data_start = header_end(data, max_bytes)
    except CheckpointError as e:
        raise InvalidUpdate(str(e)) from e
    if data_start > _MAX_REMEMBERED_HEADER_BYTES:
        return _check_new_header(data, layout, max_bytes)
    key = (len(data), bytes(data[:data_start]))
    recipe = layout.accepted.get(key)
    if recipe is None:
        recipe = _check_new_header(data, layout, max_bytes)
        if len(layout.accepted) < _MAX_REMEMBERED_HEADERS:
            layout.accepted[key] = recipe
    return recipe


def _check_new_header(data: bytes | memoryview, layout: UpdateLayout, max_bytes: int) -> _Recipe:
    try:
        header = parse_header(data, max_bytes)
    except CheckpointError as e:
        raise InvalidUpdate(str(e)) from e
    views = tensor_views(header)
    # Names, shapes and dtypes depend on the header alone; values are checked per update.
    arrays = {v.name: view_array(data, v) for v in views}
    check_tensors(arrays, layout.specs, InvalidUpdate, finite_checked=layout.specs.keys())
    flat, order = _flat_trainable(views, layout.trainable)
    trainable = set(layout.trainable)
    finite_checked = tuple(
        v.name for v in views if v.name not in trainable and v.dtype.kind in "fc"
    )
    return _Recipe(tuple(views), finite_checked, flat, order)


def _flat_trainable(
    views: list[TensorView], trainable: tuple[str, ...]
) -> tuple[TensorView | None, tuple[int, ...]]:
    """One view over all trainable tensors if they lie back to back with one dtype."""
    position = {name: i for i, name in enumerate(trainable)}
    parts = sorted((v for v in views if v.name in position), key=lambda v: v.offset)
    if not parts or any(v.dtype != parts[0].dtype for v in parts):
        return None, ()
    end = parts[0].offset
    for v in parts:
        if v.offset != end:
            return None, ()
        end += v.count * v.dtype.itemsize
    count = sum(v.count for v in parts)
    flat = TensorView("trainable", parts[0].dtype, count, parts[0].offset, (count,))
    return flat, tuple(position[v.name] for v in parts)
