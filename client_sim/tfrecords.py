"""Reads and writes TFRecord files (a device's on-disk example store) without TensorFlow.

TFRecord framing, as TensorFlow's `tf.io.TFRecordWriter` writes it: for each record a
little-endian uint64 length, the masked CRC-32C of those 8 bytes, the data, and the masked
CRC-32C of the data (mask: rotate right by 15 and add 0xa282ead8). Both CRCs are verified on
read so a truncated or corrupt file fails loudly instead of yielding garbage examples.
"""

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import google_crc32c

MAX_RECORD_BYTES = 64 * 1024 * 1024
_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    crc = int(google_crc32c.value(data))
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def write_tfrecord(path: Path, records: Iterable[bytes]) -> int:
    """Writes records to `path` in TFRecord framing; returns how many were written."""
    n = 0
    with path.open("wb") as f:
        for data in records:
            header = struct.pack("<Q", len(data))
            f.write(header)
            f.write(struct.pack("<I", masked_crc(header)))
            f.write(data)
            f.write(struct.pack("<I", masked_crc(data)))
            n += 1
    return n


def read_tfrecord(path: Path, *, max_records: int = 10_000_000) -> Iterator[bytes]:
    """Yields the records of a TFRecord file, verifying both CRCs of each.

    Raises:
      ValueError: on a truncated file, a CRC mismatch, an oversized record or too many records.
    """
    with path.open("rb") as f:
        count = 0
        while True:
            header = f.read(8)
            if not header:
                return
            if len(header) < 8:
                raise ValueError(f"{path.name}: truncated record header")
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", _read_exact(f, 4, path))
            if header_crc != masked_crc(header):
                raise ValueError(f"{path.name}: corrupt length CRC at record {count}")
            if length > MAX_RECORD_BYTES:
                raise ValueError(f"{path.name}: record of {length} bytes is too large")
            data = _read_exact(f, length, path)
            (data_crc,) = struct.unpack("<I", _read_exact(f, 4, path))
            if data_crc != masked_crc(data):
                raise ValueError(f"{path.name}: corrupt data CRC at record {count}")
            count += 1
            if count > max_records:
                raise ValueError(f"{path.name}: more than {max_records} records")
            yield data


def _read_exact(f: BinaryIO, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{path.name}: truncated record")
    return data
