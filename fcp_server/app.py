"""The Flask application factory: wires settings, database, blob store, API and worker.

Serve with `gunicorn 'fcp_server.app:create_app()'` (any number of workers and hosts on the
same database and bucket: all round state is in the database). The embedded demo default
also migrates the database and runs the background worker loop as a daemon thread; a
deployment turns both off and runs `fcp-server db upgrade` and `fcp-server worker` instead.
Follows Flask's application-factory pattern: nothing global is bound at import time.
"""

import time
from typing import Any

import numpy as np
from flask import Flask, Response, request

from fcp_server import errors, observability, worker
from fcp_server.aggregation import make_noise_rng
from fcp_server.api import (
    context,
    dashboard,
    devices,
    downloads,
    openapi,
    ops,
    tasks,
    url_converters,
)
from fcp_server.clock import Clock, SystemClock
from fcp_server.services.auth import Authenticator, OpenAuthenticator, TokenAuthenticator
from fcp_server.services.download_cache import KnownTasks, PublishedBlobs
from fcp_server.services.plan_cache import PlanCache
from fcp_server.services.round_cache import OpenRoundsCache
from fcp_server.services.round_close import Deps
from fcp_server.settings import ServerSettings
from fcp_server.storage import db
from fcp_server.storage.blobs import BlobStore, make_blob_store

_STARTED = "fcp.started"


def _observe_requests(app: Flask, metrics: observability.ServerMetrics) -> None:
    # The start time goes into the WSGI environ by a wrapper around the app rather than by a
    # before_request hook: a hook's dispatch cost more than the clock read.
    inner = app.wsgi_app

    def timed(environ: dict[str, Any], start_response: Any) -> Any:
        environ[_STARTED] = time.perf_counter()
        return inner(environ, start_response)

    app.wsgi_app = timed  # type: ignore[method-assign]

    @app.after_request
    def _record(response: Response) -> Response:
        started = request.environ.get(_STARTED)
        if started is not None:
            metrics.requests.observe(
                time.perf_counter() - started,
                request.endpoint or "unknown",
                str(response.status_code),
            )
        return response


def create_app(
    settings: ServerSettings | None = None,
    *,
    clock: Clock | None = None,
    blobs: BlobStore | None = None,
    authenticator: Authenticator | None = None,
    checkin_rng: np.random.Generator | None = None,
) -> Flask:
    """Builds the server app.

    Args:
        settings: Deployment settings; read from `FCP_*` environment variables when None.
        clock: Time source (tests inject a manual clock).
        blobs: Blob store; built from `settings.blob_url` when None.
        authenticator: Device authenticator; tokens when device auth is on, else open.
        checkin_rng: Generator for the check-in traffic draw; fresh OS entropy per request
            when None. (DP noise never uses it: see `aggregation.make_noise_rng`.)

    Returns:
        The Flask app, with `app.extensions["fcp"]` holding the `ServerContext`.
    """
    settings = settings or ServerSettings.from_env()
    if settings.auto_migrate:
        db.upgrade_schema(settings.database_url)
    database = db.connect(settings.database_url)
    if authenticator is None:
        authenticator = TokenAuthenticator() if settings.device_auth else OpenAuthenticator()
    ctx = context.ServerContext(
        settings=settings,
        database=database,
        blobs=blobs
        or make_blob_store(settings.resolved_blob_url, timeout_s=settings.blob_timeout_seconds),
        clock=clock or SystemClock(),
        authenticator=authenticator,
        metrics=observability.ServerMetrics(),
        plans=PlanCache(),
        rng_factory=(lambda: checkin_rng) if checkin_rng is not None else np.random.default_rng,
        round_cache=OpenRoundsCache(settings.checkin_round_cache_seconds),
        known_tasks=KnownTasks(),
        published_blobs=PublishedBlobs(),
    )
    # No default /static route: the dashboard serves its own assets with security headers.
    app = Flask(__name__, static_folder=None)
    # Before the blueprints: their `<int:...>` ids must never overflow the id columns.
    app.url_map.converters["int"] = url_converters.BoundedIdConverter
    context.install(app, ctx)
    errors.register_error_handlers(app)
    blueprints = (tasks, devices, downloads, ops, dashboard, openapi)
    for blueprint in (module.blueprint for module in blueprints):
        app.register_blueprint(blueprint)
    _observe_requests(app, ctx.metrics)
    if settings.embedded_worker:
        thread, stop = worker.start_in_background(worker.Worker(worker_deps(ctx)))
        app.extensions["fcp_worker"] = (thread, stop)
    return app


def worker_deps(ctx: context.ServerContext) -> Deps:
    """The round-close collaborators drawn from an app context."""
    return Deps(
        database=ctx.database,
        blobs=ctx.blobs,
        clock=ctx.clock,
        settings=ctx.settings,
        plans=ctx.plans,
        rng_factory=make_noise_rng,
        metrics=ctx.metrics,
    )
