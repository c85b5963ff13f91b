"""The accumulator's one-pass add of updates whose trainable tensors lie back to back."""

import dataclasses

import numpy as np
import pytest

from fcp_server import update_codec
from fcp_server.aggregation import update_norms
from fcp_server.aggregation.accumulator import RoundAccumulator
from fcp_server.aggregation.state import ClientUpdate, Tensor
from tests.unit.aggregation.plan_builders import make_plan, make_update
from tests.unit.test_update_codec import _blob_in_order, _tensors

MAX = 1 << 24
SHAPES = [(2, i % 3 + 1) for i in range(12)]


def _update(seed: int, scale: float = 1.0) -> ClientUpdate:
    rng = np.random.default_rng(seed)
    # Tensor i's values lie near i + 1, so a tensor summed into another's place shows.
    return make_update(
        tuple((i + 1 + rng.random(s) * scale).astype(np.float32) for i, s in enumerate(SHAPES))
    )


def _per_tensor(update: ClientUpdate) -> ClientUpdate:
    return dataclasses.replace(update, trainable_flat=None, flat_order=())


def _sums(updates: list[ClientUpdate], clip: float) -> tuple[Tensor, ...]:
    acc = RoundAccumulator(make_plan(trainable_shapes=SHAPES, clip_norm=clip))
    for u in updates:
        acc.add(u)
    return acc.update_sum_view()


def _assert_same_sums(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> None:
    assert [t.shape for t in a] == [t.shape for t in b] == SHAPES
    for x, y in zip(a, b, strict=True):
        # Scaled adds may round differently in the last bit (BLAS kernels' tails and splits).
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_updates_laid_out_as_the_encoder_writes_them_are_added_in_one_pass(monkeypatch):
    plan = make_plan(trainable_shapes=SHAPES)
    decoded = [
        update_codec.decode_update(update_codec.encode_update(_update(s)), plan, max_bytes=MAX)
        for s in range(3)
    ]
    arrays_per_add = []
    add = update_norms.add_scaled
    monkeypatch.setattr(
        update_norms, "add_scaled", lambda s, t, c: arrays_per_add.append(len(t)) or add(s, t, c)
    )
    _sums(decoded, 10.0)
    assert arrays_per_add == [1, 1, 1]


@pytest.mark.parametrize("clip", [1e6, 10.0])  # unclipped, and every update clipped
def test_flat_and_per_tensor_adds_give_the_same_sums(clip):
    plan = make_plan(trainable_shapes=SHAPES)
    decoded = [
        update_codec.decode_update(update_codec.encode_update(_update(s)), plan, max_bytes=MAX)
        for s in range(5)
    ]
    assert all(u.trainable_flat is not None for u in decoded)
    assert decoded[0].flat_order != tuple(range(12))  # by name: 0, 1, 10, 11, 2, ...
    _assert_same_sums(_sums(decoded, clip), _sums([_per_tensor(u) for u in decoded], clip))
    if clip == 1e6:
        expected = [sum(u.trainable[i] for u in decoded) for i in range(12)]
        _assert_same_sums(_sums(decoded, clip), tuple(expected))


def test_updates_laid_out_in_another_order_are_added_per_tensor():
    plan = make_plan(trainable_shapes=SHAPES)
    by_name = update_codec.encode_update(_update(1))
    tensors = _tensors(_update(2))
    reversed_order = {f"trainable/{i}": tensors[f"trainable/{i}"] for i in reversed(range(12))}
    reversed_order.update(tensors)
    decoded = [
        update_codec.decode_update(by_name, plan, max_bytes=MAX),
        update_codec.decode_update(_blob_in_order(reversed_order), plan, max_bytes=MAX),
    ]
    assert decoded[1].flat_order == tuple(reversed(range(12)))
    for updates in (decoded, decoded[::-1]):  # either layout may come first
        _assert_same_sums(_sums(updates, 1e6), _sums([_per_tensor(u) for u in updates], 1e6))


def test_a_flat_view_of_the_wrong_size_is_refused():
    acc = RoundAccumulator(make_plan(trainable_shapes=SHAPES))
    update = _update(0)
    short = np.zeros(sum(int(np.prod(s)) for s in SHAPES) - 1, np.float32)
    with pytest.raises(ValueError, match="elements"):
        acc.add(dataclasses.replace(update, trainable_flat=short, flat_order=tuple(range(12))))


def test_a_flat_order_that_is_not_a_permutation_is_refused():
    acc = RoundAccumulator(make_plan(trainable_shapes=SHAPES))
    update = _update(0)
    flat = np.concatenate([t.ravel() for t in update.trainable])
    with pytest.raises(ValueError, match="permutation"):
        acc.add(dataclasses.replace(update, trainable_flat=flat, flat_order=(0,) * 12))
