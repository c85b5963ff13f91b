"""LocalBlobStore makes every directory it creates durable, and only those it creates.

The real `os.fsync` still runs; the wrapper only records which directories were fsynced, by
resolving each fd through /proc.
"""

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from fcp_server.storage import blobs_local

Writer = Callable[[blobs_local.LocalBlobStore, str], object]
WRITERS: dict[str, Writer] = {
    "put": lambda store, name: store.put(name, b"data"),
    "put_if_absent": lambda store, name: store.put_if_absent(name, b"data"),
}


@pytest.fixture
def synced_dirs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories fsynced during the test, in order."""
    seen: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(blobs_local.os, "fsync", recording_fsync)
    return seen


@pytest.fixture
def store(tmp_path: Path) -> blobs_local.LocalBlobStore:
    return blobs_local.LocalBlobStore(tmp_path / "blobs")


@pytest.mark.parametrize("write", WRITERS.values(), ids=WRITERS.keys())
class TestDirectoryDurability:
    def test_each_new_level_is_fsynced_in_its_parent(self, store, synced_dirs, write):
        write(store, "a/b/c")
        root = store.root
        assert (root / "a.d" / "b.d").is_dir()
        assert store.get("a/b/c") == b"data"
        # root gets a.d, a.d gets b.d, then b.d gets the blob itself.
        assert synced_dirs == [root, root / "a.d", root / "a.d" / "b.d"]

    def test_an_existing_chain_costs_only_the_blob_entry_fsync(self, store, synced_dirs, write):
        store.put("a/b/c", b"first")
        synced_dirs.clear()
        write(store, "a/b/d")
        assert synced_dirs == [store.root / "a.d" / "b.d"]

    def test_only_the_missing_part_of_a_chain_is_fsynced(self, store, synced_dirs, write):
        store.put("a/b/c", b"first")
        synced_dirs.clear()
        write(store, "a/x/y/z")
        a = store.root / "a.d"
        assert synced_dirs == [a, a / "x.d", a / "x.d" / "y.d"]
        assert store.list("a/") == ["a/b/c", "a/x/y/z"]

    def test_a_top_level_blob_needs_no_new_directory(self, store, synced_dirs, write):
        write(store, "top")
        assert synced_dirs == [store.root]


def test_a_removed_root_is_recreated_durably(tmp_path, synced_dirs):
    store = blobs_local.LocalBlobStore(tmp_path / "gone" / "blobs")
    store.root.rmdir()
    store.root.parent.rmdir()
    store.put("a/b", b"data")
    assert store.get("a/b") == b"data"
    assert synced_dirs == [tmp_path, tmp_path / "gone", store.root, store.root / "a.d"]


def test_a_losing_put_if_absent_fsyncs_nothing(store, synced_dirs):
    store.put("a/b", b"first")
    synced_dirs.clear()
    assert store.put_if_absent("a/b", b"second") is False
    assert synced_dirs == []
    assert store.get("a/b") == b"first"


def test_put_if_absent_losing_the_link_race_cleans_up_and_fsyncs_nothing(
    store, synced_dirs, monkeypatch
):
    real_hit = blobs_local.fault_points.hit
    raced: list[bool] = []

    def rival_writes_first(point: str) -> None:
        # A rival writer wins between the early exists() check and our link.
        if point == "blob.partial_write" and not raced:
            raced.append(True)
            store.put("a/b", b"rival")
            synced_dirs.clear()
        real_hit(point)

    monkeypatch.setattr(blobs_local.fault_points, "hit", rival_writes_first)
    assert store.put_if_absent("a/b", b"mine") is False
    assert raced == [True]
    assert synced_dirs == []
    assert store.get("a/b") == b"rival"
    assert [p.name for p in store.root.rglob("*.tmp")] == []
