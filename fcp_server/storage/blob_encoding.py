"""What a backend stores for some content (optionally gzip) and how it reads it back, bounded.

Pure functions shared by the backends: the content's SHA-256, gzip with a fixed mtime so equal
content gives equal stored bytes, and decompression that stops at the caller's bound.
"""

import hashlib
import re
import zlib
from typing import Final

from isal import igzip

from fcp_server.storage.blob_errors import BlobCorrupt, BlobTooLarge

# What a blob is written from: bytes, or a read-only view such as an upload read into a memory
# mapping of its own (stored without first copying it into a bytes object).
BlobContent = bytes | memoryview
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
# Stored blobs are mostly float32 weights, which deflate shrinks by ~7% at any level. The
# round close compresses the client checkpoint every round, so it uses ISA-L's level 1:
# 6.6 MB of float32 weights in ~16 ms against zlib level 1's ~190 ms here, and ~0.5% smaller.
_GZIP_LEVEL: Final = 1


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
    stored = igzip.compress(content, compresslevel=_GZIP_LEVEL, mtime=0) if gzip else content
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


def gunzip_bounded(data: bytes | memoryview, max_bytes: int | None, *, what: str) -> bytes:
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
