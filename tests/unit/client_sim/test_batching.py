"""Batching follows TFF's per-epoch dataset.batch(b).take(max) semantics."""

import pytest

from client_sim import batching
from fcp_server.protos import plan_pb2


def _plan(batch_size, max_batches, epochs):
    return batching.batch_plan(
        plan_pb2.DataSpec(batch_size=batch_size, max_batches=max_batches, num_epochs=epochs)
    )


def test_last_partial_batch_is_kept():
    assert batching.batch_slices(7, _plan(3, -1, 1)) == [(0, 3), (3, 6), (6, 7)]


def test_max_batches_takes_the_first_batches_of_each_epoch():
    assert batching.batch_slices(10, _plan(3, 2, 2)) == [(0, 3), (3, 6), (0, 3), (3, 6)]


def test_examples_used_counts_every_epoch():
    assert batching.examples_used(7, _plan(3, -1, 3)) == 21


def test_zero_epochs_means_one_and_no_examples_means_no_batches():
    assert _plan(4, -1, 0).num_epochs == 1
    assert batching.batch_slices(0, _plan(4, -1, 1)) == []


@pytest.mark.parametrize(
    ("batch_size", "max_batches", "epochs", "match"),
    [
        (0, -1, 1, "batch_size"),
        (2, 0, 1, "max_batches"),
        (2, -2, 1, "max_batches"),
        (2, -1, 10**6, "num_epochs"),
    ],
)
def test_invalid_specs_are_refused(batch_size, max_batches, epochs, match):
    with pytest.raises(ValueError, match=match):
        _plan(batch_size, max_batches, epochs)


@pytest.mark.tf
@pytest.mark.parametrize(
    ("n", "b", "m", "e"), [(10, 3, -1, 1), (10, 3, 2, 2), (5, 8, -1, 3), (9, 3, 5, 1), (1, 1, 1, 2)]
)
def test_matches_tf_data_batch_take_repeat(n, b, m, e):
    tf = pytest.importorskip("tensorflow")
    # The reference pipeline: dataset.batch(b).take(m), iterated once per epoch.
    ds = tf.data.Dataset.range(n).batch(b).take(m).repeat(e)
    expected = [batch.numpy().tolist() for batch in ds]
    got = [list(range(lo, hi)) for lo, hi in batching.batch_slices(n, _plan(b, m, e))]
    assert got == expected
