"""Bounded gzip decoding for untrusted bodies (device uploads), safe against gzip bombs.

Devices upload gzip-compressed updates (ODP: `Content-Encoding: gzip`). A tiny body can inflate
to gigabytes, so decompression stops as soon as the output passes the bound instead of
inflating first and measuring afterwards; truncated streams and trailing garbage are rejected.
"""

import zlib

from fcp_server import errors

_GZIP_WBITS = 16 + zlib.MAX_WBITS


def gunzip_bounded(data: bytes | memoryview, max_bytes: int) -> bytes:
    """Decompresses one gzip member, refusing more than `max_bytes` of output.

    Raises:
        PayloadTooLarge: The output would exceed `max_bytes` (e.g. a gzip bomb).
        InvalidUpload: The data is not gzip, is truncated or has trailing bytes.
    """
    inflater = zlib.decompressobj(_GZIP_WBITS)
    try:
        # One call with the bound as `max_length`: zlib grows its output block by block and
        # stops one byte past the bound, so a bomb costs at most `max_bytes + 1` of memory.
        # (Small output steps would copy the unconsumed input on every step: quadratic.)
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as e:
        raise errors.InvalidUpload(f"upload is not valid gzip data: {e}") from e
    if len(out) > max_bytes:
        raise errors.PayloadTooLarge(f"decompressed upload exceeds the limit of {max_bytes} bytes")
    if not inflater.eof:
        raise errors.InvalidUpload("gzip upload is truncated")
    if inflater.unused_data:
        raise errors.InvalidUpload("gzip upload has trailing data after the stream")
    return out
