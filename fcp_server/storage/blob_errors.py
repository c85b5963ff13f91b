"""The errors every blob store backend raises, and only these.

The tree:

    BlobStoreError
    ├── InvalidBlobName (also ValueError)      the name breaks `validate_name`'s rules
    ├── InvalidBlobStoreUrl (also ValueError)  `make_blob_store` cannot use the URL
    ├── BlobNotFound                           no blob has this name
    ├── BlobTooLarge                           a read would exceed the caller's `max_bytes`
    ├── BlobCorrupt                            stored bytes cannot be decoded (gzip, header)
    └── BlobBackendError                       the disk or GCS failed; retrying may help
"""


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
