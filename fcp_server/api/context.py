"""Per-app collaborators (database, blobs, clock, auth, metrics) and the per-request session.

`create_app` stores one `ServerContext` in `app.extensions["fcp"]`; handlers reach it with
`server()` and get a session bound to the request with `db_session()`, closed at teardown.
Nothing is bound at import time, so several apps (tests, processes) can coexist.
"""

import dataclasses
from collections.abc import Callable

import numpy as np
from flask import Flask, current_app, g
from sqlalchemy.orm import Session

from fcp_server.clock import Clock
from fcp_server.observability import ServerMetrics
from fcp_server.services.auth import Authenticator
from fcp_server.services.download_cache import KnownTasks, PublishedBlobs
from fcp_server.services.plan_cache import PlanCache
from fcp_server.services.round_cache import OpenRoundsCache
from fcp_server.settings import ServerSettings
from fcp_server.storage.blobs import BlobStore
from fcp_server.storage.db import Database

EXTENSION_KEY = "fcp"


@dataclasses.dataclass(frozen=True)
class ServerContext:
    """Everything request handlers and the worker share inside one process."""

    settings: ServerSettings
    database: Database
    blobs: BlobStore
    clock: Clock
    authenticator: Authenticator
    metrics: ServerMetrics
    plans: PlanCache
    # Source of the check-in traffic draw (not the DP noise, which is OS-seeded).
    rng_factory: Callable[[], np.random.Generator]
    # This process's short-lived cache of open rounds for check-in (`round_cache`).
    round_cache: OpenRoundsCache
    # This process's record of tasks found and of published blobs, for downloads.
    known_tasks: KnownTasks
    published_blobs: PublishedBlobs


def server() -> ServerContext:
    """The current app's context."""
    context: ServerContext = current_app.extensions[EXTENSION_KEY]
    return context


def db_session() -> Session:
    """The request's session (created on first use, closed at teardown)."""
    session: Session | None = g.get("fcp_session")
    if session is None:
        session = server().database.sessions()
        g.fcp_session = session
    return session


def _close_session(_error: BaseException | None) -> None:
    session: Session | None = g.pop("fcp_session", None)
    if session is not None:
        session.close()


def install(app: Flask, context: ServerContext) -> None:
    """Attaches the context to the app and closes request sessions at teardown."""
    app.extensions[EXTENSION_KEY] = context
    app.teardown_appcontext(_close_session)
