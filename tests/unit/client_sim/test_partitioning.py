"""Partitioning: disjoint shards, IID balance, Dirichlet label skew, natural groups."""

import numpy as np
import pytest

from client_sim import partitioning


def _assert_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert joined.size == n
    assert np.unique(joined).size == n


def test_iid_shards_are_disjoint_and_balanced():
    parts = partitioning.iid_partition(103, 10, np.random.default_rng(0))
    _assert_disjoint_cover(parts, 103)
    assert {p.size for p in parts} == {10, 11}


def _mean_classes_per_device(alpha):
    labels = np.repeat(np.arange(10), 100)
    parts = partitioning.dirichlet_partition(labels, 20, alpha, np.random.default_rng(1))
    _assert_disjoint_cover(parts, labels.size)
    assert min(p.size for p in parts) >= 1
    # Classes holding at least 5% of the device's examples.
    return np.mean([np.sum(np.bincount(labels[p], minlength=10) >= 0.05 * p.size) for p in parts])


def test_small_alpha_gives_fewer_classes_per_device_than_large_alpha():
    assert _mean_classes_per_device(0.1) < 4 < 8 < _mean_classes_per_device(100.0)


def test_natural_partition_groups_by_writer():
    parts = partitioning.natural_partition(["b", "a", "b", "c", "a"])
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]


def test_partition_natural_needs_groups_and_enough_writers():
    spec = partitioning.parse_partition("natural")
    labels = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="natural"):
        partitioning.partition(spec, labels, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="2 writers"):
        partitioning.partition(
            spec, labels, 3, np.random.default_rng(0), groups=np.array([0, 0, 1, 1])
        )


@pytest.mark.parametrize(
    "text", ["dirichlet:0", "dirichlet:-1", "dirichlet:x", "dirichlet:nan", "random", "iid:3"]
)
def test_bad_partition_specs_are_refused(text):
    with pytest.raises(ValueError):
        partitioning.parse_partition(text)


def test_parse_partition_values():
    assert partitioning.parse_partition("dirichlet:0.5") == partitioning.PartitionSpec(
        "dirichlet", 0.5
    )
    assert partitioning.parse_partition("iid").kind == "iid"


def test_more_devices_than_examples_is_refused():
    with pytest.raises(ValueError, match="cannot give"):
        partitioning.iid_partition(3, 4, np.random.default_rng(0))
