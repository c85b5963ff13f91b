"""The downloads' per-process caches (`services.download_cache`): bounds and eviction."""

import pytest

from fcp_server.services.download_cache import CachedBlob, KnownTasks, PublishedBlobs


def _blob(stored: bytes | None, sha: str = "ab") -> CachedBlob:
    return CachedBlob(sha256=sha, gzipped=True, stored=stored)


def test_known_tasks_records_pairs_and_never_holds_more_than_its_bound():
    known = KnownTasks(max_entries=3)
    known.add("p", 1)
    known.add("p", 1)
    known.add("q", 1)
    assert ("p", 1) in known and ("q", 1) in known and ("p", 2) not in known
    assert len(known) == 2

    for task_id in range(2, 40):
        known.add("p", task_id)
        assert len(known) <= 3
    assert ("p", 39) in known  # the newest is always kept


@pytest.mark.parametrize("bad", [0, -1])
def test_bounds_must_be_positive(bad):
    with pytest.raises(ValueError):
        KnownTasks(max_entries=bad)
    with pytest.raises(ValueError):
        PublishedBlobs(max_entries=bad)


def test_published_blobs_evicts_the_least_recently_used_beyond_the_entry_bound():
    cache = PublishedBlobs(max_entries=2)
    cache.put("a", _blob(b"1"))
    cache.put("b", _blob(b"2"))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", _blob(b"3"))

    assert cache.get("b") is None
    assert cache.get("a") == _blob(b"1") and cache.get("c") == _blob(b"3")
    assert len(cache) == 2 and cache.cached_bytes == 2


def test_published_blobs_holds_at_most_max_bytes_of_stored_bytes():
    cache = PublishedBlobs(max_entries=100, max_bytes=10, max_blob_bytes=4)
    for i in range(20):
        cache.put(str(i), _blob(bytes(4)))
        assert cache.cached_bytes <= 10
    assert cache.cached_bytes == 8 and len(cache) == 2
    assert cache.get("19") is not None and cache.get("17") is None


def test_a_blob_above_the_per_blob_bound_keeps_only_its_metadata():
    cache = PublishedBlobs(max_bytes=100, max_blob_bytes=4)
    cache.put("big", _blob(bytes(5), sha="cd"))
    cache.put("small", _blob(bytes(4)))

    assert cache.get("big") == CachedBlob(sha256="cd", gzipped=True, stored=None)
    assert cache.get("small") == _blob(bytes(4))
    assert cache.cached_bytes == 4


def test_replacing_an_entry_counts_its_bytes_once():
    cache = PublishedBlobs(max_bytes=100)
    cache.put("a", _blob(None))
    cache.put("a", _blob(bytes(30)))
    cache.put("a", _blob(bytes(20)))

    assert len(cache) == 1 and cache.cached_bytes == 20


def test_metadata_only_entries_are_bounded_by_count_even_with_no_byte_budget():
    cache = PublishedBlobs(max_entries=3, max_bytes=0)
    for i in range(10):
        cache.put(str(i), _blob(bytes(1)))
    assert len(cache) == 3 and cache.cached_bytes == 0
    assert cache.get("9") == _blob(None)
