"""blob_encoding: what a gzip blob stores is standard, deterministic gzip of its content."""

import gzip
import hashlib
import zlib

import numpy as np
import pytest

from fcp_server.storage import blob_encoding


def _weights(n: int) -> bytes:
    return (np.random.default_rng(0).standard_normal(n) * 0.05).astype(np.float32).tobytes()


@pytest.mark.parametrize("content", [b"", b"x", bytes(range(256)) * 64, _weights(200_000)])
def test_gzip_blobs_are_standard_gzip_of_the_content(content):
    stored, digest = blob_encoding.encode_content(content, gzip=True)
    assert gzip.decompress(stored) == content
    assert zlib.decompress(stored, wbits=16 + zlib.MAX_WBITS) == content
    assert digest == hashlib.sha256(content).hexdigest()
    # mtime 0 and a fixed level: the same content always stores the same bytes.
    again, _ = blob_encoding.encode_content(memoryview(content).toreadonly(), gzip=True)
    assert again == stored and stored[4:8] == bytes(4)  # MTIME field (RFC 1952) is zero
    assert blob_encoding.gunzip_bounded(stored, len(content), what="w") == content


def test_float_weights_shrink_at_least_as_much_as_zlib_level_1():
    # Devices download the stored checkpoint as it is: the faster deflate must not make it
    # larger than what zlib's level 1 stored before.
    content = _weights(1_000_000)
    stored, _ = blob_encoding.encode_content(content, gzip=True)
    assert len(stored) <= len(gzip.compress(content, compresslevel=1, mtime=0))
    assert len(stored) < 0.95 * len(content)
