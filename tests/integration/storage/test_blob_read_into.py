"""BlobStore.get_into (the round close's update reads) against `get`, on every backend."""

import numpy as np
import pytest

from fcp_server.storage import blobs
from fcp_server.storage.blobs import BlobNotFound, BlobTooLarge
from fcp_server.storage.read_buffers import ReadBuffer, ViewWriter
from tests.fixtures.blobs import reads_during_rewrites


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.gcs)])
def store(request: pytest.FixtureRequest) -> blobs.BlobStore:
    chosen: blobs.BlobStore = request.getfixturevalue(
        "blob_store" if request.param == "local" else "gcs_blob_store"
    )
    return chosen


def _content(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("gzip", [False, True])
def test_successive_reads_into_one_buffer_equal_get(store, gzip):
    # Sizes that grow past a 2 MiB granule, shrink, and include the empty blob.
    sizes = [1000, 3 << 20, 0, 5000, (2 << 20) + 1]
    buffer = ReadBuffer()
    for i, size in enumerate(sizes):
        data = _content(size, i)
        store.put(f"u/{i}", data, gzip=gzip)
        got = store.get_into(f"u/{i}", buffer, max_bytes=4 << 20)
        assert bytes(got) == data == store.get(f"u/{i}")


def test_plain_reads_land_in_the_buffer_read_only(store):
    data = _content(70_000, 1)
    store.put("u", data)
    buffer = ReadBuffer()
    got = store.get_into("u", buffer)
    assert isinstance(got, memoryview) and got.readonly
    assert bytes(buffer.take(len(data))) == data  # read in place, not copied elsewhere
    assert buffer.capacity == 2 << 20


def test_reads_into_a_buffer_never_see_a_partial_write(store):
    # Versions of different sizes: a download of a newer, larger version than the metadata
    # described must not spill past the view (the GCS emulator ignores the generation pin).
    versions = [_content(100_000, 3), _content(300_000, 4), _content(20_000, 5)]
    store.put("hot", versions[0])
    buffer = ReadBuffer()  # the reader's own
    seen = reads_during_rewrites(
        lambda: bytes(store.get_into("hot", buffer)),
        lambda i: store.put("hot", versions[i % 3]),
        rewrites=30,
    )
    assert seen and all(s in versions for s in seen)


def test_view_writer_fills_its_view_and_counts_what_does_not_fit():
    view = memoryview(bytearray(8))
    writer = ViewWriter(view)
    assert writer.write(b"abc") == 3 and writer.write(memoryview(b"defgh")) == 5
    assert bytes(view) == b"abcdefgh" and writer.written == 8
    assert writer.write(b"ij") == 2 and writer.written == 10  # counted, not stored
    assert bytes(view) == b"abcdefgh"
    assert writer.seek(0) == 0 and writer.written == 0
    writer.write(b"zz")
    assert bytes(view) == b"zzcdefgh"
    with pytest.raises(OSError, match="rewind"):
        writer.seek(3)


def test_bounds_and_missing_blobs_fail_as_get_does(store):
    store.put("big", _content(10_001, 2))
    store.put("big_gz", bytes(10_001), gzip=True)
    buffer = ReadBuffer()
    for name in ("big", "big_gz"):
        with pytest.raises(BlobTooLarge):
            store.get_into(name, buffer, max_bytes=10_000)
        assert len(store.get_into(name, buffer, max_bytes=10_001)) == 10_001
    with pytest.raises(BlobNotFound):
        store.get_into("absent", buffer)


def test_growing_keeps_views_of_the_old_mapping_alive():
    buffer = ReadBuffer()
    small = buffer.take(16)
    small[:] = b"x" * 16
    large = buffer.take((2 << 20) + 1)  # a new mapping: the old one lives on through `small`
    large[:16] = b"y" * 16
    assert bytes(small) == b"x" * 16
    assert buffer.capacity == 4 << 20
    assert len(buffer.take(0)) == 0
    with pytest.raises(ValueError):
        buffer.take(-1)
