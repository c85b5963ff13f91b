"""Which storage failures mean "a dependency is down, try again", as opposed to a bug or bad data.

The database and the blob store can fail for reasons that pass on their own: PostgreSQL
restarts or drops a connection (psycopg's OperationalError, e.g. `pg_terminate_backend`, a cut
network path), the connection pool is exhausted, SQLite is locked past its busy timeout, GCS
times out or answers 5xx (`blobs.BlobBackendError`). Requests that meet one answer 503 with
Retry-After (`errors`), and a round close that meets one releases its claim without counting
the attempt (`round_close`), so a round waits for the dependency instead of failing.
Everything else (integrity errors, missing or corrupt blobs) is not transient and is handled
where it arises.
"""

from typing import Final

from sqlalchemy import exc as sa_exc

from fcp_server.storage.blobs import BlobBackendError

# SQLAlchemy wraps driver connection failures as OperationalError or InterfaceError (a closed
# connection) and raises TimeoutError when no pooled connection frees up in time.
DATABASE_ERRORS: Final = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
BLOB_ERRORS: Final = (BlobBackendError,)
DEPENDENCY_ERRORS: Final = DATABASE_ERRORS + BLOB_ERRORS


def unavailable_dependency(error: BaseException) -> str | None:
    """Names the dependency `error` says is unavailable ("database", "blob store"), else None."""
    if isinstance(error, DATABASE_ERRORS):
        return "database"
    if isinstance(error, BLOB_ERRORS):
        return "blob store"
    return None
