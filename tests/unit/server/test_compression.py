import gzip
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcp_server import errors
from fcp_server.services.compression import gunzip_bounded


def test_round_trip_at_the_exact_limit():
    data = bytes(range(256)) * 100
    assert gunzip_bounded(gzip.compress(data), len(data)) == data


def test_one_byte_over_the_limit_is_too_large():
    data = b"a" * 1000
    with pytest.raises(errors.PayloadTooLarge):
        gunzip_bounded(gzip.compress(data), 999)


def test_bomb_is_stopped_without_inflating_it():
    bomb = gzip.compress(b"\0" * (32 * 1024 * 1024), compresslevel=1)
    assert len(bomb) < 256 * 1024
    with pytest.raises(errors.PayloadTooLarge):
        gunzip_bounded(bomb, 1024 * 1024)


@pytest.mark.parametrize(
    "body",
    # mtime=0 keeps the ids identical across pytest-xdist workers.
    [
        b"",
        b"plain text",
        gzip.compress(b"x" * 100, mtime=0)[:-5],
        gzip.compress(b"x", mtime=0) + b"trailing",
    ],
)
def test_malformed_gzip_is_an_invalid_upload(body):
    with pytest.raises(errors.InvalidUpload):
        gunzip_bounded(body, 10_000)


def _member(flags: int, extra: bytes, payload: bytes) -> bytes:
    """A gzip member with header flags `flags` followed by the `extra` header fields."""
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(payload) + deflater.flush()
    header = b"\x1f\x8b\x08" + bytes([flags]) + b"\0\0\0\0\0\xff" + extra
    trailer = struct.pack("<II", zlib.crc32(payload), len(payload))
    return header + deflated + trailer


def test_every_optional_header_field_is_read():
    payload = b"update" * 50
    fields = struct.pack("<H", 3) + b"abc" + b"name\0" + b"comment\0"
    header = b"\x1f\x8b\x08\x1e\0\0\0\0\0\xff" + fields
    header_crc = struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    assert gunzip_bounded(_member(0x1E, fields + header_crc, payload), 1000) == payload
    bad_crc = struct.pack("<H", (zlib.crc32(header) & 0xFFFF) ^ 1)
    with pytest.raises(errors.InvalidUpload):
        gunzip_bounded(_member(0x1E, fields + bad_crc, payload), 1000)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda g: g[:-8] + b"\0\0\0\0" + g[-4:], id="wrong CRC-32"),
        pytest.param(lambda g: g[:-4] + struct.pack("<I", 7), id="wrong length"),
        pytest.param(lambda g: g[:2] + b"\x07" + g[3:], id="unknown method"),
        pytest.param(lambda g: g[:3] + b"\x20" + g[4:], id="reserved flag"),
        pytest.param(lambda g: g[:3] + b"\x80" + g[4:], id="high reserved flag"),
        pytest.param(lambda g: b"\x1f\x8c" + g[2:], id="wrong magic"),
        pytest.param(lambda g: zlib.compress(b"x" * 100), id="zlib stream"),
        pytest.param(lambda g: zlib.compress(b"x" * 100)[2:-4], id="raw deflate"),
    ],
)
def test_gzip_that_zlib_refuses_is_an_invalid_upload(damage):
    body = damage(gzip.compress(b"x" * 100, mtime=0))
    with pytest.raises(zlib.error):  # the reference: zlib refuses it too
        zlib.decompress(body, 16 + zlib.MAX_WBITS)
    with pytest.raises(errors.InvalidUpload):
        gunzip_bounded(body, 10_000)


def test_a_memoryview_body_is_read_like_bytes():
    data = bytes(range(256)) * 10
    assert gunzip_bounded(memoryview(gzip.compress(data)), len(data)) == data


def _zlib_answer(body: bytes, max_bytes: int) -> bytes | None:
    """zlib's reading of `body` (one complete member, nothing after it), or None if refused."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error:
        return None
    ok = len(out) <= max_bytes and inflater.eof and not inflater.unused_data
    return out if ok else None


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    payload=st.binary(max_size=3000),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 8),
    max_bytes=st.sampled_from([10, 100, 5000]),
)
def test_damaged_gzip_is_accepted_exactly_when_zlib_accepts_it(payload, edits, cut, max_bytes):
    body = bytearray(gzip.compress(payload, mtime=0))
    for position, value in edits:
        body[position % len(body)] = value
    body = body[: len(body) - cut]
    expected = _zlib_answer(bytes(body), max_bytes)
    if expected is None:
        with pytest.raises((errors.InvalidUpload, errors.PayloadTooLarge)):
            gunzip_bounded(bytes(body), max_bytes)
    else:
        assert gunzip_bounded(bytes(body), max_bytes) == expected
