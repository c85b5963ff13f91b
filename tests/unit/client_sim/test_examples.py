"""tf.train.Example encoding/parsing: round trips, FixedLenFeature checks, TF wire compatibility."""

import numpy as np
import pytest

from client_sim import examples
from fcp_server.protos import plan_pb2


def _spec(name, dtype, shape, input_name=""):
    return plan_pb2.FeatureSpec(name=name, dtype=dtype, shape=shape, input_name=input_name)


def test_round_trip_reshapes_flat_values_to_the_spec_shape():
    # Arrange
    x = np.arange(64, dtype=np.float32) / 64
    record = examples.encode_example({"x": x, "y": [7]})
    # Act
    parsed = examples.parse_batch(
        [record, record], [_spec("x", "float32", [8, 8, 1]), _spec("y", "int64", [])]
    )
    # Assert
    assert parsed["x"].shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(parsed["x"][0].ravel(), x)
    assert parsed["y"].dtype == np.int64
    assert parsed["y"].tolist() == [7, 7]


def test_wrong_element_count_is_refused_like_fixed_len_feature():
    record = examples.encode_example({"x": np.zeros(10, np.float32)})
    with pytest.raises(ValueError, match="10 values, expected 64"):
        examples.parse_feature(record, _spec("x", "float32", [64]))


def test_missing_key_and_wrong_list_type_are_refused():
    record = examples.encode_example({"x": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="missing"):
        examples.parse_feature(record, _spec("y", "int64", []))
    with pytest.raises(ValueError, match="float_list"):
        examples.parse_feature(record, _spec("x", "int64", [2]))


def test_malformed_record_is_refused():
    with pytest.raises(ValueError, match="malformed"):
        examples.parse_record(b"\xff\xff\xff")


def test_string_features_round_trip():
    record = examples.encode_example({"s": np.array([b"ab", b"c"], dtype=object)})
    assert examples.parse_feature(record, _spec("s", "string", [2])).tolist() == [b"ab", b"c"]


@pytest.mark.tf
def test_bytes_are_wire_compatible_with_tensorflow_examples():
    tf = pytest.importorskip("tensorflow")
    # Arrange: ours -> TF parse, and TF's Example -> our parse.
    x = np.linspace(0, 1, 6, dtype=np.float32)
    ours = examples.encode_example({"x": x, "y": [3]})
    theirs = tf.train.Example(
        features=tf.train.Features(
            feature={
                "x": tf.train.Feature(float_list=tf.train.FloatList(value=x.tolist())),
                "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[3])),
            }
        )
    ).SerializeToString()
    spec = {
        "x": tf.io.FixedLenFeature([2, 3], tf.float32),
        "y": tf.io.FixedLenFeature([], tf.int64),
    }
    # Act
    tf_parsed = tf.io.parse_example([ours], spec)
    our_parsed = examples.parse_batch(
        [theirs], [_spec("x", "float32", [2, 3]), _spec("y", "int64", [])]
    )
    # Assert
    np.testing.assert_array_equal(tf_parsed["x"].numpy()[0], x.reshape(2, 3))
    assert int(tf_parsed["y"][0]) == 3
    np.testing.assert_array_equal(our_parsed["x"][0], x.reshape(2, 3))
    assert our_parsed["y"].tolist() == [3]
