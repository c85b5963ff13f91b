"""Data sources: each device holds only its own examples; held-out eval devices; file sources."""

import numpy as np
import pytest

from client_sim import data_sources, examples, partitioning, tfrecords
from fcp_server.protos import plan_pb2

X = plan_pb2.FeatureSpec(name="x", dtype="float32", shape=[8, 8, 1])
Y = plan_pb2.FeatureSpec(name="y", dtype="int64", shape=[])


def test_digits_devices_hold_disjoint_real_examples():
    rng = np.random.default_rng(0)
    source = data_sources.load_digits_source(rng)
    devices = data_sources.assign_devices(source, 10, partitioning.parse_partition("iid"), rng)
    train = [d for d in devices if d.records(data_sources.TRAIN)]
    evals = [d for d in devices if d.records(data_sources.EVAL)]
    assert len(train) == 8 and len(evals) == 2
    # No device holds both collections, and no record is held by two devices.
    assert not any(d.records(data_sources.TRAIN) and d.records(data_sources.EVAL) for d in devices)
    all_records = [r for d in devices for c in d.collections.values() for r in c]
    assert len(all_records) == 1797 == len(set(all_records))
    parsed = examples.parse_batch(train[0].records(data_sources.TRAIN)[:5], [X, Y])
    assert parsed["x"].shape == (5, 8, 8, 1) and 0 <= parsed["x"].min() <= parsed["x"].max() <= 1
    assert set(parsed["y"].tolist()) <= set(range(10))


def test_label_skew_reaches_the_devices():
    rng = np.random.default_rng(1)
    source = data_sources.load_digits_source(rng)
    devices = data_sources.assign_devices(
        source, 10, partitioning.parse_partition("dirichlet:0.05"), rng, eval_device_fraction=0
    )
    labels = [examples.parse_batch(d.records("train"), [Y])["y"] for d in devices]
    dominant = [np.bincount(y, minlength=10).max() / y.size for y in labels]
    assert np.median(dominant) > 0.5


def test_tfrecord_directory_gives_one_device_per_file(tmp_path):
    for i in range(3):
        recs = [examples.encode_example({"x": np.full(64, i, np.float32), "y": [i]})] * (i + 2)
        tfrecords.write_tfrecord(tmp_path / f"writer{i}.tfrecord", recs)
    source = data_sources.load_source(
        f"tfrecord:{tmp_path}", np.random.default_rng(0), max_writers=10
    )
    devices = data_sources.assign_devices(
        source, 3, partitioning.parse_partition("natural"), np.random.default_rng(0)
    )
    assert [len(d.records("train")) for d in devices] == [2, 3, 4]
    assert examples.parse_batch(devices[2].records("train"), [Y])["y"].tolist() == [2, 2, 2, 2]


def test_emnist_h5_layout_is_read_per_writer(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 2)):
        with h5py.File(tmp_path / f"fed_emnist_digitsonly_{split}.h5", "w") as f:
            for w in ("f0000_14", "f0001_41"):
                f.create_dataset(
                    f"examples/{w}/pixels", data=rng.random((n, 28, 28), dtype=np.float32)
                )
                f.create_dataset(f"examples/{w}/label", data=np.arange(n, dtype=np.int32))
    source = data_sources.load_source(f"emnist:{tmp_path}", rng, max_writers=10)
    devices = data_sources.assign_devices(
        source, 4, partitioning.parse_partition("natural"), rng, eval_device_fraction=0.5
    )
    assert [len(d.records("train")) for d in devices[:2]] == [5, 5]
    assert [len(d.records("eval")) for d in devices[2:]] == [2, 2]
    spec = plan_pb2.FeatureSpec(name="x", dtype="float32", shape=[28, 28, 1])
    assert examples.parse_batch(devices[0].records("train"), [spec])["x"].shape == (5, 28, 28, 1)


def test_missing_files_are_reported_as_unavailable(tmp_path):
    with pytest.raises(data_sources.DataUnavailable):
        data_sources.load_source(f"emnist:{tmp_path}", np.random.default_rng(0), max_writers=1)
    with pytest.raises(data_sources.DataUnavailable):
        data_sources.load_source(f"tfrecord:{tmp_path}", np.random.default_rng(0), max_writers=1)
    with pytest.raises(ValueError, match="unknown data source"):
        data_sources.load_source("mnist", np.random.default_rng(0), max_writers=1)
