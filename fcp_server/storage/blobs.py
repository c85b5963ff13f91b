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

Error tree (every backend raises only these):

    BlobStoreError
    ├── InvalidBlobName (also ValueError)      the name breaks `validate_name`'s rules
    ├── InvalidBlobStoreUrl (also ValueError)  `make_blob_store` cannot use the URL
    ├── BlobNotFound                           no blob has this name
    ├── BlobTooLarge                           a read would exceed the caller's `max_bytes`
    ├── BlobCorrupt                            stored bytes cannot be decoded (gzip, header)
    └── BlobBackendError                       the disk or GCS failed; retrying may help
"""

import abc
import builtins
import dataclasses
import gzip as gzip_lib
import hashlib
import re
import unicodedata
import zlib
from typing import Final
from urllib.parse import unquote, urlsplit

DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
# What a blob is written from: bytes, or a read-only view such as an upload read into a memory
# mapping of its own (stored without first copying it into a bytes object).
BlobContent = bytes | memoryview
# GCS's own limit on an object name in UTF-8 bytes; a bucket prefix uses part of it.
MAX_NAME_BYTES: Final = 1024
# A segment becomes a file or directory name (plus a suffix); file systems allow 255 bytes.
MAX_SEGMENT_BYTES: Final = 200
_MAX_URL_CHARS: Final = 2048
_MAX_CONTENT_TYPE_CHARS: Final = 255
_CONTENT_TYPE_RE: Final = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(;[ -~]*)?")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
# Stored blobs are mostly float32 weights, which gzip shrinks by ~7% at any level: level 1
# gives within 0.3% of level 6's size in about 2/3 of its time (the round close compresses
# the client checkpoint every round).
_GZIP_LEVEL: Final = 1


class BlobStoreError(Exception):
    """Base of every error a blob store raises."""


class InvalidBlobName(BlobStoreError, ValueError):
    """A blob name or prefix breaks the naming rules of `validate_name`."""


class InvalidBlobStoreUrl(BlobStoreError, ValueError):
    """`make_blob_store` was given a URL it cannot use."""


class BlobNotFound(BlobStoreError):
    """No blob has the requested name."""


class BlobTooLarge(BlobStoreError):
    """Reading the blob would exceed the caller's `max_bytes`."""


class BlobCorrupt(BlobStoreError):
    """The stored bytes cannot be decoded (invalid gzip or a damaged local header)."""


class BlobBackendError(BlobStoreError):
    """The disk or the GCS service failed; the operation may succeed if retried."""


# --- names ------------------------------------------------------------------------------------


def _bad(text: str, why: str) -> InvalidBlobName:
    shown = text if len(text) <= 80 else text[:80] + "..."
    return InvalidBlobName(f"invalid blob name {shown!r}: {why}")


def _check_segment(text: str, segment: str) -> None:
    if segment == "":
        raise _bad(text, "it has an empty segment (leading, trailing or doubled '/')")
    if segment in (".", ".."):
        raise _bad(text, "'.' and '..' segments are not allowed")
    if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
        raise _bad(text, f"a segment is longer than {MAX_SEGMENT_BYTES} UTF-8 bytes")


def _check_text(text: object, max_bytes: int) -> str:
    if not isinstance(text, str):
        raise InvalidBlobName(f"blob names are str, got {type(text).__name__}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise _bad(text, "it is not valid Unicode (lone surrogate)") from e
    if size > max_bytes:
        raise _bad(text, f"it is {size} UTF-8 bytes, more than the limit of {max_bytes}")
    if "\\" in text:
        raise _bad(text, "backslashes are not allowed; use '/' between segments")
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise _bad(text, "control characters (including NUL and newlines) are not allowed")
    return text


def validate_name(name: object, *, max_bytes: int = MAX_NAME_BYTES) -> str:
    """Checks a blob name; both backends call it before touching storage.

    A name is relative and `/`-separated, with no empty, `.` or `..` segment, no backslash, no
    control character, at most `max_bytes` UTF-8 bytes and `MAX_SEGMENT_BYTES` per segment.

    Args:
        name: The candidate name.
        max_bytes: The UTF-8 length limit (GCS lowers it by its bucket prefix).

    Returns:
        The name, unchanged.

    Raises:
        InvalidBlobName: With a message saying which rule the name breaks.
    """
    text = _check_text(name, max_bytes)
    if text == "":
        raise _bad(text, "it is empty")
    for segment in text.split("/"):
        _check_segment(text, segment)
    return text


def validate_prefix(prefix: object, *, max_bytes: int = MAX_NAME_BYTES) -> str:
    """Checks a listing prefix: "" or a name whose last segment may be partial or empty.

    Raises:
        InvalidBlobName: The complete segments or the characters break the naming rules.
    """
    text = _check_text(prefix, max_bytes)
    for segment in text.split("/")[:-1]:
        _check_segment(text, segment)
    return text


def check_content_type(content_type: object) -> str:
    """Returns `content_type` if it is a plausible MIME type, else raises ValueError."""
    if (
        not isinstance(content_type, str)
        or len(content_type) > _MAX_CONTENT_TYPE_CHARS
        or not _CONTENT_TYPE_RE.fullmatch(content_type)
    ):
        raise ValueError(
            f"content_type must be a MIME type like 'application/json' of at most "
            f"{_MAX_CONTENT_TYPE_CHARS} ASCII chars, got {content_type!r}"
        )
    return content_type


# --- gzip and bounds (pure functions shared by the backends) ---------------------------------


def check_sha256(sha256: object) -> str:
    """Returns `sha256` if it is a lowercase hex SHA-256 digest, else raises ValueError."""
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    return sha256


def encode_content(
    data: BlobContent, *, gzip: bool, sha256: str | None = None
) -> tuple[BlobContent, str]:
    """Returns the bytes to store for `data` and the hex SHA-256 of the uncompressed content.

    `sha256`, when given, is the caller's digest of `data` and is used as is: uploads hash the
    body once for their own record, and hashing megabytes again would cost as much as the
    write. Gzip output has mtime 0, so equal content always gives equal stored bytes (stable
    ETags).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"blob data must be bytes, got {type(data).__name__}")
    if isinstance(data, memoryview) and data.readonly:
        content: BlobContent = data.cast("B")  # counted in bytes; no copy of an upload
    else:
        content = bytes(data)  # no copy for bytes; a mutable buffer is frozen first
    stored = gzip_lib.compress(content, compresslevel=_GZIP_LEVEL, mtime=0) if gzip else content
    digest = hashlib.sha256(content).hexdigest() if sha256 is None else check_sha256(sha256)
    return stored, digest


def check_max_bytes(max_bytes: int | None) -> None:
    """Rejects a `max_bytes` that is not None or a non-negative int."""
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0
    ):
        raise ValueError(f"max_bytes must be None or an int >= 0, got {max_bytes!r}")


def stored_limit(max_bytes: int) -> int:
    """Largest stored (gzip) size that can hold at most `max_bytes` of content.

    Deflate expands incompressible input by well under 0.1% plus a few bytes, and gzip adds an
    18-byte frame; anything beyond this margin cannot fit and is refused before download.
    """
    return max_bytes + (max_bytes >> 10) + 1024


def gunzip_bounded(data: bytes, max_bytes: int | None, *, what: str) -> bytes:
    """Decompresses gzip (one or more members), never producing more than `max_bytes`.

    Args:
        data: The gzip bytes.
        max_bytes: The largest output accepted, or None for no bound.
        what: Names the blob in error messages.

    Raises:
        BlobTooLarge: The content exceeds `max_bytes` (decompression stops at the bound).
        BlobCorrupt: `data` is not complete, valid gzip.
    """
    out = bytearray()
    pending = data
    while True:
        decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        chunk_in = pending
        try:
            while not decoder.eof:
                room = 0 if max_bytes is None else max_bytes - len(out) + 1
                produced = decoder.decompress(chunk_in, room)
                out += produced
                if max_bytes is not None and len(out) > max_bytes:
                    raise BlobTooLarge(f"blob {what} inflates to more than {max_bytes} bytes")
                chunk_in = decoder.unconsumed_tail
                if not produced and not chunk_in:
                    break
        except zlib.error as e:
            raise BlobCorrupt(f"blob {what} is stored as gzip but is not valid gzip: {e}") from e
        if not decoder.eof:
            raise BlobCorrupt(f"blob {what} is stored as gzip but the gzip stream is truncated")
        pending = decoder.unused_data
        if not pending.strip(b"\0"):  # gzip(1) also tolerates zero padding after the members
            return bytes(out)


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
        limit = None if max_bytes is None else stored_limit(max_bytes)
        try:
            raw = self.get_raw(name, max_bytes=limit)
        except BlobTooLarge as e:
            raise BlobTooLarge(f"blob {name!r} is larger than max_bytes={max_bytes}") from e
        if raw.info.gzipped:
            return gunzip_bounded(raw.data, max_bytes, what=repr(name))
        if max_bytes is not None and len(raw.data) > max_bytes:
            raise BlobTooLarge(
                f"blob {name!r} holds {len(raw.data)} bytes, more than max_bytes={max_bytes}"
            )
        return raw.data


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
