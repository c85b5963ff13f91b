"""Google Cloud Storage backend of the blob store (`gs://bucket/prefix`).

Blob `name` is the object `prefix/name` in `bucket`. Like the ODP Federated Compute server's
`GCSBlobManager`, gzip blobs are stored with `Content-Encoding: gzip` and decompressed on read;
here they are always downloaded raw (no decompressive transcoding) and gunzipped by
`blobs.BlobStore.get`, so a read is bounded and symmetric with the local backend. The SHA-256 of
the uncompressed content rides along as custom metadata `sha256`.

`google-cloud-storage` is imported only when a `gs://` store is built, so the server starts
light. With `STORAGE_EMULATOR_HOST` set (the client library's own switch to an emulator such as
`gcp-storage-emulator`) the client uses anonymous credentials and a placeholder project.

Create-only writes (`put_if_absent`) send `ifGenerationMatch=0`, which real GCS enforces
atomically. The `gcp-storage-emulator` package ignores preconditions, so the method first checks
that the object is absent: on the emulator, create-only therefore holds for sequential callers
but not for two writers racing on one name.
"""

import builtins
import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

from fcp_server.storage import blob_encoding, blob_names, blobs
from fcp_server.storage.read_buffers import ReadBuffer, ViewWriter

_LOG = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S: Final = 60.0
_MAX_TIMEOUT_S: Final = 600.0
_EMULATOR_PROJECT: Final = "fcp-emulator"
_SHA256_KEY: Final = "sha256"
_BUCKET_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
# A blob that changes between its metadata read and its download is read again this often.
_READ_ATTEMPTS: Final = 5
_Data = TypeVar("_Data", bytes, memoryview)


def _import_storage() -> Any:
    with warnings.catch_warnings():
        # google-api-core warns at import time about Python 3.11's support window and the
        # optional grpcio-status package; neither concerns the JSON API used here, and under
        # warnings-as-errors (the test suite) they would make the import itself fail.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.api_core")
        warnings.filterwarnings("ignore", category=ImportWarning, module=r"google\.api_core")
        from google.cloud import storage

    return storage


def _check_bucket(bucket: str) -> str:
    if not _BUCKET_RE.fullmatch(bucket) or any(len(p) > 63 for p in bucket.split(".")):
        raise blobs.InvalidBlobStoreUrl(
            f"GCS bucket name {bucket!r} is invalid: use 3-222 chars of a-z, 0-9, '-', '_', '.'"
            ", starting and ending with a letter or digit, dot-separated parts <= 63 chars"
        )
    return bucket


def _check_timeout(timeout_s: float) -> float:
    if not isinstance(timeout_s, int | float) or not 0 < timeout_s <= _MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s must be in (0, {_MAX_TIMEOUT_S}] seconds, got {timeout_s!r}")
    return float(timeout_s)


class GcsBlobStore(blobs.BlobStore):
    """Blobs as objects in one GCS bucket, under an optional prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        client: Any | None = None,
    ) -> None:
        """Connects to `bucket`; names are stored under `prefix/`.

        Args:
            bucket: The bucket name.
            prefix: Object-name prefix for this store ("" for the bucket root).
            timeout_s: Timeout of each HTTP request, and the budget for retrying one call
                after transient errors (the library's retry policy, not its 120 s default).
            client: A `google.cloud.storage.Client`; by default one is built from the
                environment (`STORAGE_EMULATOR_HOST` selects an emulator).

        Raises:
            InvalidBlobStoreUrl: Bad bucket name or prefix.
            BlobBackendError: No client could be built (e.g. no default credentials).
        """
        self._bucket_name = _check_bucket(bucket)
        try:
            self._prefix = blob_names.validate_name(prefix, max_bytes=512) if prefix else ""
        except blobs.InvalidBlobName as e:
            raise blobs.InvalidBlobStoreUrl(f"bad prefix in gs://{bucket}/{prefix}: {e}") from e
        self._name_budget = blob_names.MAX_NAME_BYTES - len(self._prefix.encode()) - bool(prefix)
        self._timeout = _check_timeout(timeout_s)
        _import_storage()  # first, so its import-time warnings are filtered
        from google.api_core import exceptions as api_exceptions
        from google.auth import exceptions as auth_exceptions
        from google.cloud.storage import exceptions as storage_exceptions
        from google.cloud.storage.retry import DEFAULT_RETRY
        from requests import exceptions as requests_exceptions

        # The library retries transient errors for up to 120 s by default; a request served
        # to a device must fail cleanly (503) or succeed well within the web server's own
        # timeout, so all retries of one call share the per-request timeout as their budget.
        self._retry: Any = DEFAULT_RETRY.with_timeout(self._timeout)

        self._not_found: type[Exception] = api_exceptions.NotFound
        self._precondition_failed: type[Exception] = api_exceptions.PreconditionFailed
        self._data_corruption: type[Exception] = storage_exceptions.DataCorruption
        self._transport_errors: tuple[type[Exception], ...] = (
            api_exceptions.GoogleAPIError,
            auth_exceptions.GoogleAuthError,
            requests_exceptions.RequestException,
            storage_exceptions.InvalidResponse,
        )
        with self._errors(f"create a client for gs://{bucket}"):
            self._client = client if client is not None else make_client()
        self._bucket = self._client.bucket(bucket)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        # Turns library and transport failures into the store's documented error tree.
        try:
            yield
        except self._data_corruption as e:
            raise blobs.BlobCorrupt(f"GCS download failed its checksum ({what}): {e}") from e
        except self._transport_errors as e:
            raise blobs.BlobBackendError(f"GCS could not {what}: {e}") from e

    def _object_name(self, name: str) -> str:
        blob_names.validate_name(name, max_bytes=self._name_budget)
        return f"{self._prefix}/{name}" if self._prefix else name

    def _info(self, name: str, blob: Any) -> blobs.BlobInfo:
        encoding = (blob.content_encoding or "").strip().lower()
        if encoding not in ("", "identity", "gzip"):
            raise blobs.BlobCorrupt(f"blob {name!r} has unsupported Content-Encoding {encoding!r}")
        return blobs.BlobInfo(
            name=name,
            size=int(blob.size or 0),
            gzipped=encoding == "gzip",
            content_type=blob.content_type or blobs.DEFAULT_CONTENT_TYPE,
            etag=blob.etag or "",
            sha256=(blob.metadata or {}).get(_SHA256_KEY, ""),
        )

    def _upload(
        self,
        name: str,
        data: blobs.BlobContent,
        gzip: bool,
        content_type: str,
        sha256: str | None,
        *,
        create_only: bool,
    ) -> Any:
        object_name = self._object_name(name)
        ctype = blob_names.check_content_type(content_type)
        stored, digest = blob_encoding.encode_content(data, gzip=gzip, sha256=sha256)
        blob = self._bucket.blob(object_name)
        # Set explicitly (None included) so an overwrite never inherits the old encoding.
        blob.content_encoding = "gzip" if gzip else None
        blob.metadata = {_SHA256_KEY: digest}
        blob.upload_from_string(
            bytes(stored),  # the client library takes bytes only (no copy for bytes)
            content_type=ctype,
            timeout=self._timeout,
            retry=self._retry,
            if_generation_match=0 if create_only else None,
        )
        return blob

    def put(
        self,
        name: str,
        data: blobs.BlobContent,
        *,
        gzip: bool = False,
        content_type: str = blobs.DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> blobs.BlobInfo:
        """See `BlobStore.put`."""
        with self._errors(f"write blob {name!r}"):
            blob = self._upload(name, data, gzip, content_type, sha256, create_only=False)
        return self._info(name, blob)

    def put_if_absent(
        self,
        name: str,
        data: blobs.BlobContent,
        *,
        gzip: bool = False,
        content_type: str = blobs.DEFAULT_CONTENT_TYPE,
        sha256: str | None = None,
    ) -> bool:
        """See `BlobStore.put_if_absent` (and the module docstring about emulators)."""
        # The existence check also spares re-sending the bytes of a retried upload.
        if self.exists(name):
            return False
        try:
            with self._errors(f"create blob {name!r}"):
                self._upload(name, data, gzip, content_type, sha256, create_only=True)
        except blobs.BlobBackendError as e:
            # A retry of our own successful request also lands here; the blob then holds our
            # bytes, which is what the caller wanted either way.
            if isinstance(e.__cause__, self._precondition_failed):
                return False
            raise
        return True

    def _fetch_metadata(self, name: str) -> Any:
        object_name = self._object_name(name)
        with self._errors(f"read metadata of blob {name!r}"):
            blob = self._bucket.get_blob(object_name, timeout=self._timeout, retry=self._retry)
        if blob is None:
            raise blobs.BlobNotFound(f"no blob named {name!r} in gs://{self._bucket_name}")
        return blob

    def get_raw(self, name: str, *, max_bytes: int | None = None) -> blobs.RawBlob:
        """See `BlobStore.get_raw`."""

        def download(blob: Any, generation: Any, size: int) -> bytes | None:
            del size  # the bytes object grows as the download writes
            stream = io.BytesIO()
            return stream.getvalue() if self._download(name, blob, generation, stream) else None

        return blobs.RawBlob(*self._read(name, max_bytes, download))

    def get_raw_into(
        self, name: str, buffer: ReadBuffer, *, max_bytes: int | None = None
    ) -> tuple[blobs.BlobInfo, bytes | memoryview]:
        """See `BlobStore.get_raw_into`: the download is written straight into `buffer`."""

        def download(blob: Any, generation: Any, size: int) -> memoryview | None:
            view = buffer.take(size)
            writer = ViewWriter(view)
            if not self._download(name, blob, generation, writer) or writer.written != size:
                return None  # gone, or not the size its metadata said: look again
            return view.toreadonly()

        return self._read(name, max_bytes, download)

    def _read(
        self,
        name: str,
        max_bytes: int | None,
        download: Callable[[Any, Any, int], _Data | None],
    ) -> tuple[blobs.BlobInfo, _Data]:
        # One consistent version: metadata, then the download pinned to its generation.
        blob_encoding.check_max_bytes(max_bytes)
        for _ in range(_READ_ATTEMPTS):
            blob = self._fetch_metadata(name)
            info = self._info(name, blob)
            if max_bytes is not None and info.size > max_bytes:
                raise blobs.BlobTooLarge(
                    f"blob {name!r} stores {info.size} bytes, more than max_bytes={max_bytes}"
                )
            # Read before downloading: the library resets it from the download's headers.
            generation = blob.generation
            data = download(blob, generation, info.size)
            if data is None or not self._unchanged(name, generation):
                continue  # replaced or deleted since the metadata read: look again
            if max_bytes is not None and len(data) > max_bytes:
                raise blobs.BlobTooLarge(f"blob {name!r} is larger than max_bytes={max_bytes}")
            return info, data
        raise blobs.BlobBackendError(
            f"blob {name!r} changed during each of {_READ_ATTEMPTS} read attempts"
        )

    def _download(self, name: str, blob: Any, generation: Any, stream: Any) -> bool:
        # Pinned to the generation just described; False if that generation is gone.
        try:
            with self._errors(f"download blob {name!r}"):
                blob.download_to_file(
                    stream,
                    raw_download=True,
                    if_generation_match=generation,
                    timeout=self._timeout,
                    retry=self._retry,
                )
        except blobs.BlobBackendError as e:
            if isinstance(e.__cause__, (self._not_found, self._precondition_failed)):
                return False
            raise
        return True

    def _unchanged(self, name: str, generation: Any) -> bool:
        # Real GCS already enforces the pin above, but gcp-storage-emulator ignores
        # preconditions; a generation that is the same after the download proves on any server
        # that the bytes belong to the metadata (every write gets a new generation).
        with self._errors(f"read metadata of blob {name!r}"):
            after = self._bucket.get_blob(
                self._object_name(name), timeout=self._timeout, retry=self._retry
            )
        return after is not None and after.generation == generation

    def stat(self, name: str) -> blobs.BlobInfo:
        """See `BlobStore.stat`."""
        return self._info(name, self._fetch_metadata(name))

    def exists(self, name: str) -> bool:
        """See `BlobStore.exists`."""
        object_name = self._object_name(name)
        with self._errors(f"check blob {name!r}"):
            blob = self._bucket.blob(object_name)
            return bool(blob.exists(timeout=self._timeout, retry=self._retry))

    def delete(self, name: str) -> bool:
        """See `BlobStore.delete`."""
        object_name = self._object_name(name)
        try:
            with self._errors(f"delete blob {name!r}"):
                self._bucket.blob(object_name).delete(timeout=self._timeout, retry=self._retry)
        except blobs.BlobBackendError as e:
            if isinstance(e.__cause__, self._not_found):
                return False
            raise
        return True

    def list(self, prefix: str = "") -> builtins.list[str]:
        """See `BlobStore.list`."""
        blob_names.validate_prefix(prefix, max_bytes=self._name_budget)
        root = f"{self._prefix}/" if self._prefix else ""
        names = []
        with self._errors(f"list blobs under {prefix!r}"):
            for blob in self._client.list_blobs(
                self._bucket, prefix=root + prefix, timeout=self._timeout, retry=self._retry
            ):
                name = blob.name[len(root) :]
                try:
                    names.append(blob_names.validate_name(name, max_bytes=self._name_budget))
                except blobs.InvalidBlobName:
                    # Written by another tool; it could not be read through this store either.
                    _LOG.warning("skipping object %r: not a valid blob name", blob.name)
        return sorted(names)

    @property
    def timeout_s(self) -> float:
        """Per-request timeout, also the retry budget of one call."""
        return self._timeout

    def close(self) -> None:
        """Closes the client's HTTP session."""
        self._client.close()


def make_client() -> Any:
    """Builds a `google.cloud.storage.Client` from the environment.

    Default credentials and project normally; with `STORAGE_EMULATOR_HOST` set, anonymous
    credentials and the project `GOOGLE_CLOUD_PROJECT` (else a placeholder), as emulators
    check neither.
    """
    storage = _import_storage()
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        project = os.environ.get("GOOGLE_CLOUD_PROJECT", _EMULATOR_PROJECT)
        # google-auth leaves this constructor untyped.
        anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]
        return storage.Client(project=project, credentials=anonymous)
    return storage.Client()
