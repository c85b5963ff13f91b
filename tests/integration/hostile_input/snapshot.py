"""Before/after pictures of everything a request could change: every table row and blob file."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from fcp_server.storage import models
from fcp_server.storage.db import Database


@dataclass(frozen=True)
class Snapshot:
    """Table name -> sorted row reprs, and blob path -> SHA-256 of its bytes."""

    rows: dict[str, list[str]]
    blobs: dict[str, str]

    def changed_tables(self, after: "Snapshot") -> set[str]:
        """Tables whose rows differ in `after`."""
        return {
            t for t in set(self.rows) | set(after.rows) if self.rows.get(t) != after.rows.get(t)
        }

    def changed_blobs(self, after: "Snapshot") -> set[str]:
        """Blob files added, removed or rewritten in `after`."""
        names = set(self.blobs) | set(after.blobs)
        return {n for n in names if self.blobs.get(n) != after.blobs.get(n)}

    def diff(self, after: "Snapshot") -> list[str]:
        """What changed from this snapshot to `after`, one line per table or blob."""
        changes = []
        for table in sorted(set(self.rows) | set(after.rows)):
            before_rows, after_rows = set(self.rows.get(table, [])), set(after.rows.get(table, []))
            if before_rows != after_rows:
                changes.append(
                    f"table {table}: -{sorted(before_rows - after_rows)[:3]} "
                    f"+{sorted(after_rows - before_rows)[:3]}"
                )
        for name in sorted(set(self.blobs) | set(after.blobs)):
            if self.blobs.get(name) != after.blobs.get(name):
                changes.append(f"blob {name}: {self.blobs.get(name)} -> {after.blobs.get(name)}")
        return changes


def take(database: Database, blob_root: Path) -> Snapshot:
    """Reads every row of every table and hashes every file under the blob root."""
    rows = {}
    with database.engine.connect() as conn:
        for table in models.Base.metadata.sorted_tables:
            rows[table.name] = sorted(repr(tuple(row)) for row in conn.execute(select(table)))
    blobs = {
        _blob_name(path.relative_to(blob_root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(blob_root.rglob("*"))
        if path.is_file()
    }
    return Snapshot(rows=rows, blobs=blobs)


def _blob_name(relative: Path) -> str:
    """The blob name of a LocalBlobStore file (`a.d/b.d/c.blob` is `a/b/c`); any other file
    (a temporary file left behind) keeps its raw path, so it shows up as a change."""
    *dirs, leaf = relative.parts
    if leaf.endswith(".blob") and all(d.endswith(".d") for d in dirs):
        return "/".join([*(d[: -len(".d")] for d in dirs), leaf[: -len(".blob")]])
    return str(relative)
