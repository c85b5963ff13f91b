"""TFRecord framing without TensorFlow: round trip, corruption detection, TF compatibility."""

import numpy as np
import pytest

from client_sim import examples, tfrecords


def test_round_trip(tmp_path):
    path = tmp_path / "d.tfrecord"
    records = [b"", b"a", bytes(range(256)) * 10]
    assert tfrecords.write_tfrecord(path, records) == 3
    assert list(tfrecords.read_tfrecord(path)) == records


def test_corruption_and_truncation_are_detected(tmp_path):
    path = tmp_path / "d.tfrecord"
    tfrecords.write_tfrecord(path, [b"hello world"])
    data = bytearray(path.read_bytes())
    data[14] ^= 0xFF  # inside the payload
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="data CRC"):
        list(tfrecords.read_tfrecord(path))
    path.write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match="truncated"):
        list(tfrecords.read_tfrecord(path))


@pytest.mark.tf
def test_files_interoperate_with_tensorflow(tmp_path):
    tf = pytest.importorskip("tensorflow")
    ours = tmp_path / "ours.tfrecord"
    recs = [examples.encode_example({"x": np.full(3, i, np.float32)}) for i in range(4)]
    tfrecords.write_tfrecord(ours, recs)
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(ours))] == recs
    theirs = tmp_path / "theirs.tfrecord"
    with tf.io.TFRecordWriter(str(theirs)) as w:
        for r in recs:
            w.write(r)
    assert list(tfrecords.read_tfrecord(theirs)) == recs
