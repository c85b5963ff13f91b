"""Decoding device updates: remembered headers and the flat view of the trainable tensors."""

import dataclasses
import json

import numpy as np
import pytest

from fcp_server import update_codec
from fcp_server.aggregation.state import ClientUpdate, Tensor
from fcp_server.safetensors_codec import encode_tensors, header_end
from tests.unit.aggregation.plan_builders import constant_update, make_plan, make_update

MAX = 1 << 24
_SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "int64": "I64"}


def _blob_in_order(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors blob with the tensors' bytes in the dict's order (any order is valid)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        dtype = _SAFETENSORS_DTYPES[str(t.dtype)]
        header[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(t.tobytes() for t in tensors.values())


def _tensors(update: ClientUpdate) -> dict[str, Tensor]:
    tensors = {f"trainable/{i}": t for i, t in enumerate(update.trainable)}
    tensors["num_examples"] = np.array(update.num_examples, np.int64)
    for name, state in update.metrics.items():
        tensors.update({f"metric/{name}/{k}": t for k, t in enumerate(state)})
    return tensors


def _header(data: bytes) -> bytes:
    return data[: header_end(data, MAX)]


def test_a_layout_parses_each_header_once(monkeypatch):
    layout = update_codec.update_layout(make_plan())
    calls = []
    parse = update_codec.parse_header
    monkeypatch.setattr(update_codec, "parse_header", lambda *a: calls.append(1) or parse(*a))
    first = update_codec.encode_update(constant_update(0.1))
    second = update_codec.encode_update(constant_update(0.2))
    assert _header(first) == _header(second)
    a = update_codec.decode_update(first, layout, max_bytes=MAX)
    b = update_codec.decode_update(second, layout, max_bytes=MAX)
    assert len(calls) == 1 and len(layout.accepted) == 1
    np.testing.assert_array_equal(a.trainable[0], np.full((3, 2), 0.1, np.float32))
    np.testing.assert_array_equal(b.trainable[0], np.full((3, 2), 0.2, np.float32))
    assert b.sum_of_squares == pytest.approx(8 * 0.2**2, rel=1e-6)


def _with(name: str, value: Tensor) -> bytes:
    tensors = _tensors(constant_update(0.1))
    tensors[name] = value
    return encode_tensors(tensors)


# Same names, shapes and dtypes as a valid update (so the same header), bad values.
_BAD_VALUES = [
    (_with("trainable/1", np.array([0.0, np.nan], np.float32)), "'trainable/1' has NaN"),
    (_with("trainable/0", np.full((3, 2), -np.inf, np.float32)), "'trainable/0' has NaN"),
    (_with("metric/loss/0", np.array(np.inf, np.float32)), "'metric/loss/0' has NaN"),
    (_with("num_examples", np.array(-1, np.int64)), "'num_examples' is -1"),
    (_with("num_examples", np.array(10**9, np.int64)), "'num_examples' is 1000000000"),
]


@pytest.mark.parametrize(
    ("data", "match"), _BAD_VALUES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_a_remembered_header_does_not_vouch_for_the_values(data, match):
    good = update_codec.encode_update(constant_update(0.1))
    assert _header(data) == _header(good)
    layout = update_codec.update_layout(make_plan())
    update_codec.decode_update(good, layout, max_bytes=MAX)
    with pytest.raises(update_codec.InvalidUpdate, match=match):
        update_codec.decode_update(data, layout, max_bytes=MAX, max_num_examples=10**6)


@pytest.mark.parametrize("change", ["shorter", "longer"])
def test_a_remembered_header_on_a_blob_of_another_length_is_checked_again(change):
    good = update_codec.encode_update(constant_update(0.1))
    bad = good[:-4] if change == "shorter" else good + bytes(4)
    layout = update_codec.update_layout(make_plan())
    update_codec.decode_update(good, layout, max_bytes=MAX)
    with pytest.raises(update_codec.InvalidUpdate, match="data area"):
        update_codec.decode_update(bad, layout, max_bytes=MAX)


def test_remembered_headers_are_bounded_in_number_and_size():
    layout = update_codec.update_layout(make_plan())
    tensors = _tensors(constant_update(0.1))
    for i in range(update_codec._MAX_REMEMBERED_HEADERS + 4):
        blob = _blob_in_order(tensors, {"i": str(i)})
        assert update_codec.decode_update(blob, layout, max_bytes=MAX).num_examples == 10
    assert len(layout.accepted) == update_codec._MAX_REMEMBERED_HEADERS
    layout = update_codec.update_layout(make_plan())
    big = _blob_in_order(tensors, {"pad": "x" * update_codec._MAX_REMEMBERED_HEADER_BYTES})
    assert update_codec.decode_update(big, layout, max_bytes=MAX).num_examples == 10
    assert not layout.accepted


def _distinct_trainable(count: int) -> tuple[Tensor, ...]:
    # Each tensor's values say which tensor it is, so a misplaced one shows.
    return tuple(np.full((2, i % 3 + 1), i + 1, np.float32) for i in range(count))


def test_back_to_back_trainable_tensors_get_one_flat_view_in_their_order():
    trainable = _distinct_trainable(12)
    plan = make_plan(trainable_shapes=[t.shape for t in trainable])
    data = update_codec.encode_update(make_update(trainable))
    update = update_codec.decode_update(data, plan, max_bytes=MAX)
    # The safetensors library writes tensors of one dtype ordered by name.
    order = tuple(sorted(range(12), key=lambda i: f"trainable/{i}"))
    assert update.flat_order == order
    assert update.trainable_flat is not None
    np.testing.assert_array_equal(
        update.trainable_flat, np.concatenate([trainable[i].ravel() for i in order])
    )
    assert all(np.shares_memory(update.trainable_flat, t) for t in update.trainable)
    assert not update.trainable_flat.flags.writeable
    assert update.sum_of_squares == pytest.approx(sum(float(np.sum(t * t)) for t in trainable))


def test_no_flat_view_when_other_tensors_lie_between_the_trainable_ones():
    tensors = _tensors(constant_update(0.25))
    spread = {k: tensors[k] for k in ("trainable/0", "num_examples", "trainable/1")}
    spread.update(tensors)
    update = update_codec.decode_update(_blob_in_order(spread), make_plan(), max_bytes=MAX)
    assert update.trainable_flat is None and update.flat_order == ()
    np.testing.assert_array_equal(update.trainable[1], np.full(2, 0.25, np.float32))
    assert update.sum_of_squares == pytest.approx(8 * 0.25**2)


def test_no_flat_view_when_the_trainable_tensors_have_different_dtypes():
    plan = make_plan()
    plan.model.trainable[1].dtype = "float64"
    update = constant_update(0.5)
    update = dataclasses.replace(update, trainable=(update.trainable[0], np.full(2, 0.5)))
    decoded = update_codec.decode_update(update_codec.encode_update(update), plan, max_bytes=MAX)
    assert decoded.trainable_flat is None
    assert decoded.sum_of_squares == pytest.approx(8 * 0.25)
