"""One contract, every backend: LocalBlobStore on a temp dir and GcsBlobStore on a real GCS
API emulator (marked gcs), plus backend-specific checks and the URL factory."""

import gzip
import hashlib
import mmap
import os
import resource
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from fcp_server.storage import blobs, blobs_gcs, blobs_local
from fcp_server.storage.blobs import (
    BlobCorrupt,
    BlobNotFound,
    BlobStoreError,
    BlobTooLarge,
    InvalidBlobName,
    InvalidBlobStoreUrl,
)
from tests.fixtures.blobs import reads_during_rewrites

ALL_BYTES = bytes(range(256)) * 4
ALL_BYTES_SHA256 = hashlib.sha256(ALL_BYTES).hexdigest()

INVALID_NAMES = [
    "",
    "/abs",
    "trailing/",
    "a//b",
    ".",
    "..",
    "./a",
    "a/./b",
    "a/../b",
    "a/..",
    "back\\slash",
    "nul\x00byte",
    "new\nline",
    "tab\tchar",
    "del\x7fchar",
    "c1\x85control",
    "x" * 1025,
    "é" * 513,  # 1026 UTF-8 bytes
    "a/" + "s" * 201,  # one segment too long for a file name
    "lone\ud800surrogate",
]


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.gcs)])
def store(request: pytest.FixtureRequest) -> blobs.BlobStore:
    chosen: blobs.BlobStore = request.getfixturevalue(
        "blob_store" if request.param == "local" else "gcs_blob_store"
    )
    return chosen


class TestBlobStoreContract:
    def test_round_trip(self, store):
        # Arrange
        data = b"checkpoint bytes"
        # Act
        info = store.put("pop/1/0/s/0/checkpoint", data)
        # Assert
        assert store.get("pop/1/0/s/0/checkpoint") == data
        assert info.name == "pop/1/0/s/0/checkpoint"
        assert info.size == len(data)
        assert not info.gzipped
        assert info.sha256 == hashlib.sha256(data).hexdigest()

    def test_gzip_round_trip_stores_gzip_and_reads_plain(self, store):
        data = b"plan " * 1000
        info = store.put("plans/p1", data, gzip=True, content_type="application/x-protobuf")
        raw = store.get_raw("plans/p1")
        assert store.get("plans/p1") == data
        assert info.gzipped and raw.info.gzipped and store.stat("plans/p1").gzipped
        assert gzip.decompress(raw.data) == data
        assert raw.info.size == len(raw.data) < len(data)
        assert raw.info.content_type == "application/x-protobuf"
        assert raw.info.sha256 == hashlib.sha256(data).hexdigest()

    def test_stat_matches_put_and_etag_tracks_content(self, store):
        first = store.put("m.json", b"{}", content_type="application/json")
        stat = store.stat("m.json")
        second = store.put("m.json", b'{"a": 1}', content_type="application/json")
        assert (stat.size, stat.content_type, stat.etag) == (2, "application/json", first.etag)
        assert stat.etag and second.etag != first.etag
        assert store.stat("m.json").etag == second.etag

    def test_overwrite_replaces_content_and_encoding(self, store):
        store.put("x", b"old" * 100, gzip=True)
        store.put("x", b"new")
        assert store.get("x") == b"new"
        assert not store.stat("x").gzipped
        assert store.get_raw("x").data == b"new"

    def test_exists(self, store):
        assert not store.exists("a/b")
        store.put("a/b", b"1")
        assert store.exists("a/b")
        assert not store.exists("a")  # a prefix is not a blob

    def test_list_by_prefix_sorted_nested_and_exact(self, store):
        names = ["a/b/c", "a/bc", "b/a", "a/x/y/z", "ab", "a/b/d", "a"]
        for n in names:
            store.put(n, n.encode())
        assert store.list() == sorted(names)
        assert store.list("a/") == ["a/b/c", "a/b/d", "a/bc", "a/x/y/z"]
        assert store.list("a/b/") == ["a/b/c", "a/b/d"]
        assert store.list("a/b") == ["a/b/c", "a/b/d", "a/bc"]  # plain string prefix, as GCS
        assert store.list("a/x/y/z") == ["a/x/y/z"]
        assert store.list("zzz") == []
        assert store.list("q/r/") == []

    def test_a_name_and_names_below_it_coexist(self, store):
        store.put("a", b"top")
        store.put("a/b", b"below")
        assert (store.get("a"), store.get("a/b")) == (b"top", b"below")
        assert store.delete("a")
        assert store.list() == ["a/b"]

    def test_delete(self, store):
        store.put("d/1", b"x")
        store.put("d/2", b"y")
        assert store.delete("d/1") is True
        assert store.delete("d/1") is False  # missing: no error
        assert not store.exists("d/1")
        assert store.list("d/") == ["d/2"]
        with pytest.raises(BlobNotFound):
            store.get("d/1")

    def test_put_if_absent_creates_once(self, store):
        assert store.put_if_absent("u/assignment-1", b"first", gzip=True) is True
        assert store.put_if_absent("u/assignment-1", b"second") is False
        assert store.get("u/assignment-1") == b"first"
        assert store.stat("u/assignment-1").gzipped
        store.delete("u/assignment-1")
        assert store.put_if_absent("u/assignment-1", b"third") is True
        assert store.get("u/assignment-1") == b"third"

    @pytest.mark.parametrize("name", INVALID_NAMES)
    def test_invalid_names_are_rejected_everywhere(self, store, name):
        calls: list[Callable[[], object]] = [
            lambda: store.put(name, b"x"),
            lambda: store.put_if_absent(name, b"x"),
            lambda: store.get(name),
            lambda: store.get_raw(name),
            lambda: store.stat(name),
            lambda: store.exists(name),
            lambda: store.delete(name),
        ]
        for call in calls:
            with pytest.raises(InvalidBlobName, match="invalid blob name"):
                call()
        assert store.list() == []

    @pytest.mark.parametrize("prefix", ["/a", "a//", "../", "a/./", "x\\", "n\x00"])
    def test_invalid_list_prefixes_are_rejected(self, store, prefix):
        with pytest.raises(InvalidBlobName):
            store.list(prefix)

    def test_non_string_name_is_rejected(self, store):
        with pytest.raises(InvalidBlobName, match="str"):
            store.get(b"bytes-name")

    def test_missing_blob(self, store):
        for call in (store.get, store.get_raw, store.stat):
            with pytest.raises(BlobNotFound, match="no blob named 'nope/x'"):
                call("nope/x")
        assert not store.exists("nope/x")
        assert store.delete("nope/x") is False

    def test_max_bytes_bounds_reads(self, store):
        store.put("big", b"z" * 100)
        assert store.get("big", max_bytes=100) == b"z" * 100
        with pytest.raises(BlobTooLarge, match="max_bytes=99"):
            store.get("big", max_bytes=99)
        with pytest.raises(BlobTooLarge):
            store.get_raw("big", max_bytes=99)
        with pytest.raises(ValueError, match="max_bytes"):
            store.get("big", max_bytes=-1)

    def test_gzip_bomb_is_stopped_at_max_bytes(self, store):
        store.put("bomb", bytes(8 << 20), gzip=True)
        assert store.stat("bomb").size < 64 << 10  # tiny on the wire, 8 MiB inflated
        with pytest.raises(BlobTooLarge, match="inflates to more than 1048576"):
            store.get("bomb", max_bytes=1 << 20)
        assert len(store.get("bomb", max_bytes=8 << 20)) == 8 << 20

    @pytest.mark.parametrize("use_gzip", [False, True])
    def test_binary_data_with_every_byte_value(self, store, use_gzip):
        store.put("bin", ALL_BYTES, gzip=use_gzip)
        assert store.get("bin") == ALL_BYTES

    @pytest.mark.parametrize("use_gzip", [False, True])
    def test_empty_blob(self, store, use_gzip):
        info = store.put("empty", b"", gzip=use_gzip)
        assert store.get("empty") == b""
        assert store.exists("empty")
        assert (info.size == 0) is not use_gzip

    @pytest.mark.parametrize("use_gzip", [False, True])
    def test_buffers_are_stored_as_their_bytes(self, store, use_gzip):
        # An upload arrives as a read-only view of a memory mapping; any buffer is stored as
        # its content at the time of the call.
        mapping = mmap.mmap(-1, len(ALL_BYTES))
        mapping[:] = ALL_BYTES
        assert store.put_if_absent("mapped", memoryview(mapping).toreadonly(), gzip=use_gzip)
        mutable = bytearray(ALL_BYTES)
        store.put("mutable", memoryview(mutable), gzip=use_gzip, sha256=ALL_BYTES_SHA256)
        mutable[:] = bytes(len(mutable))
        assert store.get("mapped") == ALL_BYTES
        assert store.get("mutable") == ALL_BYTES
        assert store.stat("mapped").sha256 == ALL_BYTES_SHA256

    def test_unicode_names(self, store):
        store.put("données/模型/ok", b"1")
        assert store.list("données/") == ["données/模型/ok"]

    def test_bad_arguments(self, store):
        with pytest.raises(TypeError, match="bytes"):
            store.put("s", "text")
        with pytest.raises(ValueError, match="content_type"):
            store.put("s", b"1", content_type="not a type\n")
        assert not store.exists("s")

    def test_readers_never_see_a_partial_write(self, store):
        versions = [b"a" * (256 << 10), b"b" * (512 << 10)]
        store.put("hot", versions[0])
        seen = reads_during_rewrites(
            lambda: store.get("hot"),
            lambda i: store.put("hot", versions[i % 2], gzip=i % 3 == 0),
            rewrites=20,
        )
        seen.append(store.get("hot"))
        assert [s[:4] for s in seen if s not in versions] == []

    def test_error_tree(self):
        assert issubclass(InvalidBlobName, ValueError)
        assert issubclass(InvalidBlobName, BlobStoreError)
        for cls in (BlobNotFound, BlobTooLarge, BlobCorrupt, blobs.BlobBackendError):
            assert issubclass(cls, BlobStoreError)


class TestLocalBlobStore:
    def test_failed_write_keeps_old_content_and_leaves_no_temp_file(self, blob_store):
        blob_store.put("ckpt", b"old")
        # A real mid-write failure: the file-size limit makes write() fail with EFBIG.
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
        try:
            with pytest.raises(blobs.BlobBackendError, match="cannot write blob 'ckpt'"):
                blob_store.put("ckpt", os.urandom(1 << 20))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)
        assert blob_store.get("ckpt") == b"old"
        assert [p.name for p in blob_store.root.rglob("*") if p.name.endswith(".tmp")] == []

    def test_in_flight_temp_files_are_not_listed(self, blob_store):
        blob_store.put("a/b", b"1")
        (blob_store.root / "a.d" / ".half-written.tmp").write_bytes(b"partial")
        assert blob_store.list() == ["a/b"]

    def test_damaged_file_is_reported_corrupt(self, blob_store):
        blob_store.put("c", b"1")
        (blob_store.root / "c.blob").write_bytes(b"garbage")
        with pytest.raises(BlobCorrupt, match="damaged header"):
            blob_store.get("c")

    def test_stores_on_one_root_share_blobs(self, blob_store):
        other = blobs.make_blob_store(blob_store.root.as_uri())
        blob_store.put("shared", b"1")
        assert other.get("shared") == b"1"

    def test_put_if_absent_has_exactly_one_winner_under_contention(self, blob_store):
        results: list[bool] = []
        barrier = threading.Barrier(8)

        def race(i: int) -> None:
            barrier.wait()
            results.append(blob_store.put_if_absent("race", str(i).encode()))

        threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 7 + [True]
        assert blob_store.get("race").decode() in {str(i) for i in range(8)}


@pytest.mark.gcs
class TestGcsBlobStore:
    def test_reads_gzip_objects_uploaded_directly_by_devices(self, gcs_emulator, monkeypatch):
        # A device PUTs `Content-Encoding: gzip` bytes straight to the bucket (ODP upload path).
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
        client = blobs_gcs.make_client()
        store = blobs_gcs.GcsBlobStore(gcs_emulator.bucket, "devices", client=client)
        try:
            obj = client.bucket(gcs_emulator.bucket).blob("devices/pop/1/1/d/upload")
            obj.content_encoding = "gzip"
            obj.upload_from_string(gzip.compress(b"gradient"), content_type="application/x-gz")
            assert store.get("pop/1/1/d/upload") == b"gradient"
            assert store.stat("pop/1/1/d/upload").sha256 == ""
        finally:
            store.close()

    def test_the_server_bounds_blob_calls_by_its_setting(self, gcs_emulator, monkeypatch, tmp_path):
        from fcp_server.app import create_app
        from fcp_server.settings import ServerSettings

        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
        settings = ServerSettings.from_env(
            {
                "FCP_DATABASE_URL": f"sqlite:///{tmp_path / 'fcp.db'}",
                "FCP_BLOB_URL": f"gs://{gcs_emulator.bucket}/timeouts",
                "FCP_BLOB_TIMEOUT_SECONDS": "4.5",
                "FCP_EMBEDDED_WORKER": "false",
            }
        )
        store = create_app(settings).extensions["fcp"].blobs
        try:
            assert isinstance(store, blobs_gcs.GcsBlobStore)
            assert store.timeout_s == 4.5
        finally:
            store.close()

    def test_prefixes_isolate_stores_in_one_bucket(self, gcs_emulator, monkeypatch):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
        one = blobs.make_blob_store(f"gs://{gcs_emulator.bucket}/iso/p")
        two = blobs.make_blob_store(f"gs://{gcs_emulator.bucket}/iso/p2")
        try:
            one.put("x", b"1")
            two.put("y", b"2")
            assert (one.list(), two.list()) == (["x"], ["y"])
            assert not one.exists("y")
        finally:
            one.close()
            two.close()

    def test_prefix_counts_against_the_name_limit(self, gcs_emulator, monkeypatch):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
        store = blobs.make_blob_store(f"gs://{gcs_emulator.bucket}/{'p' * 100}")
        try:
            with pytest.raises(InvalidBlobName, match="limit of 923"):
                store.put("n/" * 462 + "n", b"1")
        finally:
            store.close()


class TestMakeBlobStore:
    def test_file_url_with_escaped_characters(self, tmp_path):
        root = tmp_path / "with space"
        store = blobs.make_blob_store(root.as_uri())
        assert isinstance(store, blobs_local.LocalBlobStore)
        assert store.root == Path(root)
        assert root.is_dir()

    @pytest.mark.parametrize(
        "url",
        [
            "",
            "s3://bucket/x",
            "file://host/dir",
            "file:relative/dir",
            "file:///srv/x?query=1",
            "gs://",
            "gs://Upper_Case",
            "gs://ab",
            "gs://bucket/p//q",
            "gs://bucket/../x",
            "/no/scheme",
        ],
    )
    def test_bad_urls_are_rejected_before_any_io(self, url):
        with pytest.raises(InvalidBlobStoreUrl):
            blobs.make_blob_store(url)

    def test_gcs_timeout_is_bounded(self):
        with pytest.raises(ValueError, match="timeout_s"):
            blobs.make_blob_store("gs://some-bucket", timeout_s=0)
