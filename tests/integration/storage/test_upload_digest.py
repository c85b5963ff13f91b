"""Writes that carry the caller's SHA-256 (device uploads hash the body once and pass it down):
every backend records the given digest without hashing the content again, and refuses a
malformed one before storing anything."""

import hashlib

import pytest

from fcp_server.storage import blob_encoding, blobs

DATA = bytes(range(256)) * 64
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.gcs)])
def store(request: pytest.FixtureRequest) -> blobs.BlobStore:
    chosen: blobs.BlobStore = request.getfixturevalue(
        "blob_store" if request.param == "local" else "gcs_blob_store"
    )
    return chosen


def _forbid_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the content was hashed although its digest was given")

    monkeypatch.setattr(blob_encoding.hashlib, "sha256", refuse)


@pytest.mark.parametrize("gzip", [False, True])
def test_put_if_absent_records_the_given_digest_without_hashing(store, monkeypatch, gzip):
    _forbid_hashing(monkeypatch)

    assert store.put_if_absent("u/a/gradient", DATA, gzip=gzip, sha256=DIGEST) is True

    assert store.stat("u/a/gradient").sha256 == DIGEST
    assert store.get("u/a/gradient") == DATA


def test_put_records_the_given_digest_without_hashing(store, monkeypatch):
    _forbid_hashing(monkeypatch)

    info = store.put("u/a/gradient", DATA, sha256=DIGEST)

    assert info.sha256 == DIGEST
    assert store.stat("u/a/gradient").sha256 == DIGEST


def test_without_a_digest_the_store_computes_it(store):
    assert store.put_if_absent("u/a/gradient", DATA) is True
    assert store.stat("u/a/gradient").sha256 == DIGEST


@pytest.mark.parametrize("bad", ["", "ab" * 31, DIGEST.upper(), DIGEST[:-1] + "g", b"x" * 64])
def test_a_malformed_digest_is_refused_and_nothing_is_stored(store, bad):
    with pytest.raises(ValueError, match="sha256"):
        store.put_if_absent("u/a/gradient", DATA, sha256=bad)
    with pytest.raises(ValueError, match="sha256"):
        store.put("u/a/gradient", DATA, sha256=bad)

    assert not store.exists("u/a/gradient")
