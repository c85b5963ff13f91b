"""Per-process caches for device downloads: tasks known to exist, and published blobs.

Every plan and checkpoint download first checks that its task exists (an unknown task is a
404 and no blob is probed), then reads the blob's metadata for its ETag and the blob itself.
Both answers are fixed once a task has left CREATED:

- Tasks are never deleted, only moved to an ended status (CANCELED, COMPLETED, FAILED), and
  downloads serve a task's artifacts whatever its status. So once a process has found a task
  in the database, later downloads of it need no SELECT (`KnownTasks`).
- A task's plan is written at the name downloads serve only by the open that moved the task
  out of CREATED, before that open commits (uploads store theirs under names of their own:
  `artifacts`); its round-0 client checkpoint is written when it opens, and each later one
  once by the round close, a repeated close rewriting the same bytes (`round_outputs`), or by
  the eval round start that claimed the iteration. So the blobs a download serves for a task
  past CREATED never change once a device can be assigned to them (the module docstring of
  `api.downloads` tells clients the same, which may cache them for an hour), and their ETag,
  encoding and, for small ones, stored bytes can be kept (`PublishedBlobs`). Only a caller
  guessing a URL before its round exists could fetch a blob whose writer's transaction then
  rolls back and is redone with other bytes (an eval round start); this cache, like that
  caller's, would then keep the first bytes.

Only tasks found past CREATED are recorded, and only their blobs cached. An unknown task, or
one still CREATED, is looked up on every request, so a task created or opened meanwhile by
another process or host (same database) is seen at once, and probing unknown ids cannot grow
either cache; a blob not found is never cached. Each process (gunicorn worker, host) keeps
its own caches and needs no coordination. Both are bounded; all methods are thread-safe.

A download answered from these caches needs neither the database nor the blob store, so
during an outage of either it still succeeds where an uncached one answers 503.
"""

import collections
import dataclasses
import threading

# A deployment has a handful of active tasks per population; the cap only guards memory.
MAX_KNOWN_TASKS = 4096
MAX_BLOBS = 1024
# The stored bytes of the blobs kept in memory, in all: small against a web worker's ~180 MiB
# (benchmark B6), and enough for the plans and checkpoints of small models.
MAX_CACHED_BYTES = 4 << 20
# Larger blobs keep only their metadata (a model's checkpoint can be several MB).
MAX_CACHED_BLOB_BYTES = 512 << 10


class KnownTasks:
    """(population, task id) pairs this process has found in the database past CREATED.

    When full it starts over, which costs one SELECT per task afterwards.
    """

    def __init__(self, max_entries: int = MAX_KNOWN_TASKS) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max = max_entries
        self._known: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._known

    def __len__(self) -> int:
        return len(self._known)

    def add(self, pop: str, task_id: int) -> None:
        """Records task `pop`/`task_id` (call only once found past CREATED)."""
        key = (pop, task_id)
        with self._lock:
            if key in self._known:
                return
            if len(self._known) >= self._max:
                self._known = set()
            self._known.add(key)


@dataclasses.dataclass(frozen=True)
class CachedBlob:
    """What a download needs of a published blob."""

    # Hex SHA-256 of the uncompressed content (the download's ETag).
    sha256: str
    # The stored bytes are gzip.
    gzipped: bool
    # The stored bytes, when gzipped and small enough to keep; else None.
    stored: bytes | None


class PublishedBlobs:
    """A least-recently-used cache of `CachedBlob`s by blob name, bounded in entries and bytes."""

    def __init__(
        self,
        max_entries: int = MAX_BLOBS,
        max_bytes: int = MAX_CACHED_BYTES,
        max_blob_bytes: int = MAX_CACHED_BLOB_BYTES,
    ) -> None:
        if max_entries < 1 or max_bytes < 0 or max_blob_bytes < 0:
            raise ValueError(
                f"need max_entries >= 1 and byte bounds >= 0, got {max_entries}, "
                f"{max_bytes}, {max_blob_bytes}"
            )
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_blob_bytes = min(max_blob_bytes, max_bytes)
        self._blobs: collections.OrderedDict[str, CachedBlob] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def cached_bytes(self) -> int:
        """The stored bytes held, in all."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._blobs)

    def get(self, name: str) -> CachedBlob | None:
        """The blob's cached entry, or None."""
        with self._lock:
            entry = self._blobs.get(name)
            if entry is not None:
                self._blobs.move_to_end(name)
            return entry

    def put(self, name: str, entry: CachedBlob) -> None:
        """Caches a published blob's entry, without its stored bytes when they are large."""
        if entry.stored is not None and len(entry.stored) > self._max_blob_bytes:
            entry = dataclasses.replace(entry, stored=None)
        with self._lock:
            old = self._blobs.pop(name, None)
            if old is not None:
                self._bytes -= _size(old)
            self._blobs[name] = entry
            self._bytes += _size(entry)
            while len(self._blobs) > self._max_entries or self._bytes > self._max_bytes:
                _, evicted = self._blobs.popitem(last=False)
                self._bytes -= _size(evicted)


def _size(entry: CachedBlob) -> int:
    return 0 if entry.stored is None else len(entry.stored)
