"""Blob storage for plans, checkpoints, client updates and metrics: one interface, two backends.

Every artifact the server hands out or receives goes through `BlobStore`, chosen by URL with
`make_blob_store`: `file:///abs/dir` gives `blobs_local.LocalBlobStore` (the embedded default,
shared by all gunicorn workers on one host) and `gs://bucket/prefix` gives
`blobs_gcs.GcsBlobStore`.

It follows the ODP Federated Compute server's `GCSBlobManager` (object names such as
`{pop}/{task}/{n}/s/0/checkpoint`; writes may be gzip with `Content-Encoding: gzip`, and reads
decompress them) and Cloud Storage's object-naming rules
(https://cloud.google.com/storage/docs/objects#naming), made stricter so that one name means the
same object on disk and in a bucket.

The error tree is in `blob_errors`; names are checked by `blob_names` and content is
encoded by `blob_encoding`.
"""

import abc
import builtins
import dataclasses
from typing import Final, TypeVar
from urllib.parse import unquote, urlsplit

from fcp_server.storage.blob_encoding import (
    BlobContent,
    check_max_bytes,
    gunzip_bounded,
    stored_limit,
)
from fcp_server.storage.blob_errors import (
    BlobBackendError,
    BlobCorrupt,
    BlobNotFound,
    BlobStoreError,
    BlobTooLarge,
    InvalidBlobName,
    InvalidBlobStoreUrl,
)
from fcp_server.storage.read_buffers import ReadBuffer

# The errors and the content type are part of this interface: callers import them from here.
__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "BlobBackendError",
    "BlobContent",
    "BlobCorrupt",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreError",
    "BlobTooLarge",
    "InvalidBlobName",
    "InvalidBlobStoreUrl",
    "RawBlob",
    "make_blob_store",
]

DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
_MAX_URL_CHARS: Final = 2048


# --- the interface ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    """What a backend knows about one stored blob, without its content."""

    # The blob's name relative to the store, as passed to `put`.
    name: str
    # Stored bytes: the compressed size when `gzipped`.
    size: int
    # True when the stored bytes are gzip (serve them with `Content-Encoding: gzip`).
    gzipped: bool
    # MIME type of the uncompressed content.
    content_type: str
    # Opaque validator that changes whenever the stored bytes change (quote it for HTTP).
    etag: str
    # Hex SHA-256 of the uncompressed content; "" for objects written outside this store.
    sha256: str


@dataclasses.dataclass(frozen=True)
class RawBlob:
    """A blob's stored bytes (still gzip when `info.gzipped`) with their metadata."""

    info: BlobInfo
    data: bytes


class BlobStore(abc.ABC):
    """Named byte blobs, each write replacing the whole blob atomically.

    Readers see the old or the new bytes of a blob, never a mix. `get` returns the uncompressed
    content whatever the stored encoding; `get_raw` returns the stored bytes, for serving with
    `Content-Encoding`. All names go through `validate_name`.
    """

    @abc.abstractmethod
    def put(
        self,
        name: str,
        data: BlobContent,
        *,
        gzip: bool = False,
        content_type: str = DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> BlobInfo:
        """Stores `data` under `name`, replacing any blob (and its encoding) already there.

        Args:
            name: The blob name.
            data: The uncompressed content.
            gzip: Store it gzip-compressed (`get` still returns it uncompressed).
            content_type: MIME type of the uncompressed content.
            sha256: The hex SHA-256 of `data` if the caller has it (recorded, not recomputed).

        Returns:
            The new blob's metadata.

        Raises:
            InvalidBlobName: `name` breaks the naming rules.
            ValueError: `sha256` is not 64 lowercase hex digits.
            BlobBackendError: The write failed; the previous content, if any, is kept.
        """

    @abc.abstractmethod
    def put_if_absent(
        self,
        name: str,
        data: BlobContent,
        *,
        gzip: bool = False,
        content_type: str = DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> bool:
        """Creates `name` only if no blob has that name, so retried uploads are idempotent.

        Args:
            name: The blob name.
            data: The uncompressed content.
            gzip: Store it gzip-compressed.
            content_type: MIME type of the uncompressed content.
            sha256: The hex SHA-256 of `data` if the caller has it (recorded, not recomputed).

        Returns:
            True if this call created the blob; False if one existed (it is left unchanged).

        Raises:
            InvalidBlobName: `name` breaks the naming rules.
            ValueError: `sha256` is not 64 lowercase hex digits.
            BlobBackendError: The write failed.
        """

    @abc.abstractmethod
    def get_raw(self, name: str, *, max_bytes: int | None = None) -> RawBlob:
        """Reads one consistent version of `name`: stored bytes and metadata.

        Args:
            name: The blob name.
            max_bytes: If given, refuse blobs whose stored size exceeds it.

        Raises:
            BlobNotFound: No blob has this name.
            BlobTooLarge: The stored size exceeds `max_bytes`.
        """

    @abc.abstractmethod
    def stat(self, name: str) -> BlobInfo:
        """Returns the metadata of `name` without reading its content.

        Raises:
            BlobNotFound: No blob has this name.
        """

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Returns whether a blob named `name` exists."""

    @abc.abstractmethod
    def delete(self, name: str) -> bool:
        """Deletes `name`; returns False, raising nothing, if there was no such blob."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """Returns the sorted names that start with `prefix` (a plain string prefix, as in GCS).

        `list("a/")` returns every blob under `a/` at any depth; `list("a/b")` also matches
        `a/bc`. Complete segments of the prefix obey the naming rules.
        """

    def close(self) -> None:  # noqa: B027 (an optional hook: only network backends hold anything)
        """Releases connections held by the backend; the store must not be used afterwards."""

    def get(self, name: str, *, max_bytes: int | None = None) -> bytes:
        """Returns the uncompressed content of `name`, gunzipping what was stored gzip.

        Args:
            name: The blob name.
            max_bytes: If given, the largest content accepted. For gzip blobs it is enforced
                while decompressing, so a gzip bomb costs at most `max_bytes` of memory.

        Raises:
            BlobNotFound: No blob has this name.
            BlobTooLarge: The content is larger than `max_bytes`.
            BlobCorrupt: The blob is marked gzip but is not valid gzip.
        """
        check_max_bytes(max_bytes)
        try:
            raw = self.get_raw(name, max_bytes=_stored_limit(max_bytes))
        except BlobTooLarge as e:
            raise BlobTooLarge(f"blob {name!r} is larger than max_bytes={max_bytes}") from e
        return _content(name, raw.info, raw.data, max_bytes)

    def get_raw_into(
        self, name: str, buffer: ReadBuffer, *, max_bytes: int | None = None
    ) -> tuple[BlobInfo, bytes | memoryview]:
        """`get_raw`, with the stored bytes read into `buffer` where the backend can.

        This default returns `get_raw`'s bytes; stores that read in place override it.
        """
        del buffer  # a backend that cannot read in place ignores it
        raw = self.get_raw(name, max_bytes=max_bytes)
        return raw.info, raw.data

    def get_into(
        self, name: str, buffer: ReadBuffer, *, max_bytes: int | None = None
    ) -> bytes | memoryview:
        """`get`, read into `buffer` where the backend can (the round close's update reads).

        A returned view of `buffer` is read-only and valid until the buffer's next use (see
        `ReadBuffer`); gunzipped content is a new object.

        Raises:
            The errors of `get`.
        """
        check_max_bytes(max_bytes)
        try:
            info, data = self.get_raw_into(name, buffer, max_bytes=_stored_limit(max_bytes))
        except BlobTooLarge as e:
            raise BlobTooLarge(f"blob {name!r} is larger than max_bytes={max_bytes}") from e
        return _content(name, info, data, max_bytes)


_Stored = TypeVar("_Stored", bytes, memoryview, bytes | memoryview)


def _stored_limit(max_bytes: int | None) -> int | None:
    return None if max_bytes is None else stored_limit(max_bytes)


def _content(name: str, info: BlobInfo, data: _Stored, max_bytes: int | None) -> bytes | _Stored:
    """The stored bytes uncompressed (gzip bounded by `max_bytes`), or refused as too large."""
    if info.gzipped:
        return gunzip_bounded(data, max_bytes, what=repr(name))
    if max_bytes is not None and len(data) > max_bytes:
        raise BlobTooLarge(
            f"blob {name!r} holds {len(data)} bytes, more than max_bytes={max_bytes}"
        )
    return data


# --- factory ----------------------------------------------------------------------------------


def make_blob_store(url: str, *, timeout_s: float = 60.0) -> BlobStore:
    """Builds the blob store a URL names.

    Args:
        url: `file:///absolute/dir` (percent-encoded, as `Path.as_uri()` writes it) or
            `gs://bucket[/prefix]`.
        timeout_s: Per-request timeout of the GCS backend, in seconds.

    Returns:
        A `blobs_local.LocalBlobStore` or a `blobs_gcs.GcsBlobStore`.

    Raises:
        InvalidBlobStoreUrl: The URL has another scheme or a malformed location.
        BlobBackendError: The store cannot be opened (directory not creatable, no GCS
            credentials).
    """
    if not isinstance(url, str) or not url or len(url) > _MAX_URL_CHARS:
        raise InvalidBlobStoreUrl(
            f"blob store URL must be a non-empty str of at most {_MAX_URL_CHARS} chars"
        )
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise InvalidBlobStoreUrl(f"blob store URL {url!r} must not have a query or fragment")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidBlobStoreUrl(f"file URL {url!r} must look like file:///absolute/dir")
        # Imported here: it imports this module.
        from fcp_server.storage.blobs_local import LocalBlobStore

        return LocalBlobStore(unquote(parts.path))
    if parts.scheme == "gs":
        # Imported here: it imports this module, and only gs:// deployments need it.
        from fcp_server.storage import blobs_gcs

        path = unquote(parts.path)
        return blobs_gcs.GcsBlobStore(parts.netloc, path.strip("/"), timeout_s=timeout_s)
    raise InvalidBlobStoreUrl(
        f"blob store URL {url!r} has unsupported scheme {parts.scheme!r}; use file:// or gs://"
    )
