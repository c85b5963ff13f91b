"""Encodes and parses a device's training examples as serialized tf.train.Example records.

A device's example store holds `tf.train.Example` protos (TensorFlow's
`tensorflow/core/example/example.proto`), the format the ODP task builder's DataSpec parses
with `tf.io.parse_example` and FixedLenFeature specs. The schema is declared here in a private
descriptor pool (same field numbers, so the bytes are wire-identical to `tf.train.Example`) so
that the fleet process can build and partition data without importing TensorFlow; parsing into
numpy follows FixedLenFeature semantics: exact element count, reshaped to the feature's shape.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from fcp_server.protos import plan_pb2

# Bounds so a corrupt record cannot make a device allocate without limit.
MAX_RECORD_BYTES = 4 * 1024 * 1024
MAX_FEATURE_VALUES = 1 << 20

_FLOAT_DTYPES = ("float32",)
_INT_DTYPES = ("int64", "int32")
_STRING_DTYPES = ("string",)


def _build_example_classes() -> tuple[type[Message], type[Message]]:
    """Declares tf.train.Example's schema (field numbers from TensorFlow) in a private pool."""
    f = descriptor_pb2.FileDescriptorProto(
        name="fcp_client_sim/example.proto", package="fcp_client_sim", syntax="proto3"
    )
    lab = descriptor_pb2.FieldDescriptorProto
    for list_name, ftype, packed in (
        ("BytesList", lab.TYPE_BYTES, False),
        ("FloatList", lab.TYPE_FLOAT, True),
        ("Int64List", lab.TYPE_INT64, True),
    ):
        msg = f.message_type.add(name=list_name)
        field = msg.field.add(name="value", number=1, type=ftype, label=lab.LABEL_REPEATED)
        if packed:
            field.options.packed = True
    feature = f.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (fname, tname) in enumerate(
        (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")),
        start=1,
    ):
        feature.field.add(
            name=fname,
            number=number,
            type=lab.TYPE_MESSAGE,
            type_name=f".fcp_client_sim.{tname}",
            label=lab.LABEL_OPTIONAL,
            oneof_index=0,
        )
    features = f.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=lab.TYPE_STRING, label=lab.LABEL_OPTIONAL)
    entry.field.add(
        name="value",
        number=2,
        type=lab.TYPE_MESSAGE,
        type_name=".fcp_client_sim.Feature",
        label=lab.LABEL_OPTIONAL,
    )
    features.field.add(
        name="feature",
        number=1,
        type=lab.TYPE_MESSAGE,
        type_name=".fcp_client_sim.Features.FeatureEntry",
        label=lab.LABEL_REPEATED,
    )
    example = f.message_type.add(name="Example")
    example.field.add(
        name="features",
        number=1,
        type=lab.TYPE_MESSAGE,
        type_name=".fcp_client_sim.Features",
        label=lab.LABEL_OPTIONAL,
    )
    pool: Any = descriptor_pool.DescriptorPool()
    pool.Add(f)
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("fcp_client_sim.Example")),
        get(pool.FindMessageTypeByName("fcp_client_sim.Feature")),
    )


Example, Feature = _build_example_classes()

FeatureValue = np.ndarray[Any, Any] | Sequence[float] | Sequence[int] | Sequence[bytes]


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
    """Serializes one example; floats become a FloatList, integers an Int64List.

    Args:
      features: feature key -> values (any shape; flattened row-major as tf.train.Example).

    Returns:
      The serialized tf.train.Example bytes.

    Raises:
      ValueError: for an empty key or a value dtype that has no tf.train.Example list type.
    """
    ex: Any = Example()
    for key, value in features.items():
        if not key:
            raise ValueError("feature keys must be non-empty")
        arr = np.asarray(value)
        feat = ex.features.feature[key]
        if arr.dtype.kind == "f":
            feat.float_list.value.extend(arr.astype(np.float32).ravel().tolist())
        elif arr.dtype.kind in "iub":
            feat.int64_list.value.extend(arr.astype(np.int64).ravel().tolist())
        elif arr.dtype.kind in "SO":
            feat.bytes_list.value.extend(bytes(v) for v in arr.ravel().tolist())
        else:
            raise ValueError(f"feature {key!r}: unsupported dtype {arr.dtype}")
    data: bytes = ex.SerializeToString(deterministic=True)
    return data


def _values(feature: Any, spec: plan_pb2.FeatureSpec) -> np.ndarray[Any, Any]:
    kind = feature.WhichOneof("kind")
    if spec.dtype in _FLOAT_DTYPES and kind == "float_list":
        return np.asarray(feature.float_list.value, dtype=np.float32)
    if spec.dtype in _INT_DTYPES and kind == "int64_list":
        return np.asarray(feature.int64_list.value, dtype=np.int64)
    if spec.dtype in _STRING_DTYPES and kind == "bytes_list":
        return np.asarray(list(feature.bytes_list.value), dtype=object)
    raise ValueError(f"feature {spec.name!r}: stored as {kind}, the plan expects {spec.dtype}")


def parse_feature(record: bytes, spec: plan_pb2.FeatureSpec) -> np.ndarray[Any, Any]:
    """Parses one feature of one record as tf.io.FixedLenFeature(spec.shape, spec.dtype) would.

    Args:
      record: a serialized tf.train.Example.
      spec: the plan's feature spec (key, parsed dtype, per-example shape).

    Returns:
      The values with shape `spec.shape` and the parsed dtype.

    Raises:
      ValueError: if the record is malformed, the key is missing, or the element count or
        list type does not match the spec.
    """
    shape = tuple(int(d) for d in spec.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"feature {spec.name!r}: FixedLenFeature needs a static shape")
    want = int(np.prod(shape, dtype=np.int64))
    if want > MAX_FEATURE_VALUES:
        raise ValueError(f"feature {spec.name!r}: {want} values exceed {MAX_FEATURE_VALUES}")
    ex = parse_record(record)
    if spec.name not in ex.features.feature:
        raise ValueError(f"feature {spec.name!r} is missing from the example")
    vals = _values(ex.features.feature[spec.name], spec)
    if vals.size != want:
        raise ValueError(f"feature {spec.name!r}: {vals.size} values, expected {want} {shape}")
    return vals.reshape(shape)


def parse_record(record: bytes) -> Any:
    """Decodes one serialized tf.train.Example (bounded size) into the message object.

    Raises:
      ValueError: if the record is too large or is not a valid Example.
    """
    if len(record) > MAX_RECORD_BYTES:
        raise ValueError(f"example record of {len(record)} bytes exceeds {MAX_RECORD_BYTES}")
    ex: Any = Example()
    try:
        ex.ParseFromString(record)
    except DecodeError as e:
        raise ValueError(f"malformed tf.train.Example record: {e}") from e
    return ex


def parse_batch(
    records: Sequence[bytes], specs: Sequence[plan_pb2.FeatureSpec]
) -> dict[str, np.ndarray[Any, Any]]:
    """Parses a batch as tf.io.parse_example: one stacked array per spec, keyed by spec.name.

    Values keep the parsed dtype (int32 model inputs arrive as int64; the device program
    casts them, as the reference's parse-then-cast pipeline does).
    """
    out: dict[str, np.ndarray[Any, Any]] = {}
    for spec in specs:
        rows = [parse_feature(r, spec) for r in records]
        shape = (len(records), *(int(d) for d in spec.shape))
        out[spec.name] = np.stack(rows) if rows else np.zeros(shape, _numpy_dtype(spec.dtype))
    return out


def _numpy_dtype(name: str) -> np.dtype[Any]:
    if name == "string":
        return np.dtype(object)
    try:
        return np.dtype(name)
    except TypeError as e:
        raise ValueError(f"unknown dtype {name!r} in the plan's DataSpec") from e
