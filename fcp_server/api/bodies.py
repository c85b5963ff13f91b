"""Request bodies read within a bound: messages as bytes, device updates into buffers of their own.

Every body is refused as soon as it is known to exceed its bound: from Content-Length before
anything is read, otherwise after reading one byte past the bound.

A device update is megabytes (6.6 MB for the 1.66M-parameter CNN of the ODP guide). Read the
usual way, each one passes through several heap buffers of that size (the server's read buffer,
a bound-sized read buffer, the final bytes object); glibc then serves the next update's buffers
from a heap that the previous ones fragmented, and a web worker's resident memory creeps up with
every upload. `read_update` instead reads the body in steps of `_READ_STEP` straight into an
anonymous memory mapping of exactly its size, unmapped when the last view of it goes away: the
heap never sees a large buffer, and memory stays flat however many updates a worker receives.
The mapping is not pre-faulted (MAP_POPULATE would save ~1 ms per 6.6 MB): its pages become
resident only as bytes arrive, so a client that declares a large Content-Length and sends
nothing holds no memory.
"""

import io
import mmap

from flask import request

from fcp_server import errors

# Per read from the server's input stream: small enough that the server's own per-read
# buffers are recycled by malloc, large enough that the per-call cost does not matter.
_READ_STEP = 1 << 20
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


def _declared_length(max_bytes: int) -> int | None:
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise errors.PayloadTooLarge(f"body is {declared} bytes, the limit is {max_bytes}")
    return declared


def read_body(max_bytes: int) -> bytes:
    """The request body as bytes (for messages and artifacts), at most `max_bytes`.

    Raises:
        PayloadTooLarge: The body is longer than `max_bytes`.
    """
    declared = _declared_length(max_bytes)
    # With a Content-Length, ask for exactly that much: asking for the bound would make the
    # stream allocate a bound-sized buffer (a megabyte for every check-in).
    data = request.stream.read(max_bytes + 1 if declared is None else declared)
    if len(data) > max_bytes:
        raise errors.PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
    return data


def mapped_buffer(size: int) -> memoryview:
    """A writable, zero-filled buffer of `size` bytes in an anonymous memory mapping.

    An empty one is a view of `b""` (a mapping cannot be empty) and so is read-only.
    """
    return memoryview(mmap.mmap(-1, size, flags=_MAP_FLAGS) if size else b"")


def read_update(max_bytes: int) -> memoryview:
    """The request body in a memory mapping of its own (see the module docstring).

    The view is read-only; the mapping is released when the last view of it (including numpy
    arrays decoded from it) is gone.

    Raises:
        PayloadTooLarge: The body is longer than `max_bytes`.
        BadRequest: The body ended before its Content-Length.
    """
    declared = _declared_length(max_bytes)
    if declared is None:  # chunked transfer: the size is known only at the end
        return _copy_to_mapping(_read_chunks(max_bytes))
    view = mapped_buffer(declared)
    filled = 0
    while filled < declared:
        step = _read_into(view[filled : filled + _READ_STEP])
        if not step:
            raise errors.BadRequest(f"body ended after {filled} of {declared} bytes")
        filled += step
    return view.toreadonly()


def _read_into(target: memoryview) -> int:
    stream = request.stream
    if isinstance(stream, io.RawIOBase):  # werkzeug's stream: reads without an extra copy
        return stream.readinto(target) or 0
    data = stream.read(len(target))
    target[: len(data)] = data
    return len(data)


def _read_chunks(max_bytes: int) -> list[bytes]:
    chunks, total = [], 0
    while chunk := request.stream.read(min(_READ_STEP, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise errors.PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
    return chunks


def _copy_to_mapping(chunks: list[bytes]) -> memoryview:
    view = mapped_buffer(sum(len(c) for c in chunks))
    start = 0
    for chunk in chunks:
        view[start : start + len(chunk)] = chunk
        start += len(chunk)
    return view.toreadonly()
