"""BlobStore.get_into (the round close's update reads) against `get`, on every backend."""

import numpy as np
import pytest

from fcp_server.storage import blobs
from fcp_server.storage.blobs import BlobNotFound, BlobTooLarge
from fcp_server.storage.read_buffers import ReadBuffer


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


def test_local_reads_land_in_the_buffer_read_only(blob_store):
    data = _content(70_000, 1)
    blob_store.put("u", data)
    buffer = ReadBuffer()
    got = blob_store.get_into("u", buffer)
    assert isinstance(got, memoryview) and got.readonly
    assert bytes(buffer.take(len(data))) == data  # read in place, not copied elsewhere
    assert buffer.capacity == 2 << 20


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
