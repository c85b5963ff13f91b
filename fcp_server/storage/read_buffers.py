"""One reusable memory buffer for reading update-sized blobs, on transparent huge pages.

The round close reads each of a round's updates, scans it twice (the norm, then the clipped
add; `aggregation.update_norms`) and drops it before reading the next. Read into a new bytes
object per update, every scan walks the update's 4 KiB pages (1,600 for the 6.6 MB update of
the ODP guide's EMNIST CNN); in one mapping reused for the whole round and advised to use
2 MiB pages, the same round's aggregation measured ~15% faster (B1 notes).
"""

import mmap

# Capacity grows in whole huge pages, so a slightly larger update does not remap.
_GRANULE = 2 << 20


class ReadBuffer:
    """A growable anonymous mapping; each `take` hands out its first `size` bytes anew.

    A view from `take` is valid until the next `take` on the same buffer, which overwrites
    it: use one buffer per reader, and drop every view of one blob before reading the next.
    When the buffer grows, the old mapping lives on until its last view is gone.
    """

    def __init__(self) -> None:
        """Starts empty: nothing is mapped until the first `take`."""
        self._map: mmap.mmap | None = None

    @property
    def capacity(self) -> int:
        """Bytes currently mapped."""
        return 0 if self._map is None else len(self._map)

    def take(self, size: int) -> memoryview:
        """A writable view of `size` bytes (their content is whatever the buffer held).

        Raises:
            ValueError: If `size` is negative.
        """
        if size < 0:
            raise ValueError(f"size must be >= 0, found {size}")
        if size == 0:
            return memoryview(bytearray())
        if self._map is None or len(self._map) < size:
            capacity = -(-size // _GRANULE) * _GRANULE
            # Not closed: views of the old mapping may still be alive; it goes with the last.
            self._map = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux only; elsewhere plain pages
                self._map.madvise(mmap.MADV_HUGEPAGE)
        return memoryview(self._map)[:size]


class ViewWriter:
    """A write-only stream whose writes land in one view, never beyond it.

    The GCS store's `get_raw_into` hands it to the client library's download. Bytes past
    the view's end are counted, not stored: `written` then exceeds `len(view)`, and the
    caller treats the read as failed.
    """

    def __init__(self, view: memoryview) -> None:
        """Writes will fill `view` from its start."""
        self._view = view
        self.written = 0

    def write(self, data: bytes | memoryview) -> int:
        """Copies `data` after what was written so far; returns its length."""
        size = len(data)
        end = self.written + size
        if end <= len(self._view):
            self._view[self.written : end] = data
        self.written = end
        return size

    def seek(self, offset: int, whence: int = 0) -> int:
        """Only a rewind to the start (a download that starts over) is supported."""
        if (offset, whence) != (0, 0):
            raise OSError("a ViewWriter can only rewind to its start")
        self.written = 0
        return 0
