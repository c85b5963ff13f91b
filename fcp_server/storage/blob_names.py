"""Blob names and content types: the rules every backend checks before any I/O.

Cloud Storage's object-naming rules (https://cloud.google.com/storage/docs/objects#naming),
made stricter so that one name means the same object on disk and in a bucket.
"""

import re
import unicodedata
from typing import Final

from fcp_server.storage.blob_errors import InvalidBlobName

# GCS's own limit on an object name in UTF-8 bytes; a bucket prefix uses part of it.
MAX_NAME_BYTES: Final = 1024
# A segment becomes a file or directory name (plus a suffix); file systems allow 255 bytes.
MAX_SEGMENT_BYTES: Final = 200
_MAX_CONTENT_TYPE_CHARS: Final = 255
_CONTENT_TYPE_RE: Final = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(;[ -~]*)?")


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
