"""Operational endpoints: liveness, readiness and Prometheus metrics.

/healthz answers while the process is up, /ready only when the database answers (the
reference stubbed both probes, TODO 291594777), /metrics renders `observability`'s series.
"""

from flask import Blueprint, Response
from sqlalchemy import func, select

from fcp_server.api.context import server
from fcp_server.storage import db
from fcp_server.storage.models import Round, Task

blueprint = Blueprint("ops", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    """The process is up."""
    return Response("ok\n", mimetype="text/plain")


@blueprint.get("/ready")
def ready() -> Response:
    """The database answers; 503 otherwise."""
    if db.is_reachable(server().database):
        return Response("ready\n", mimetype="text/plain")
    return Response("database unreachable\n", status=503, mimetype="text/plain")


def _status_gauges() -> dict[str, dict[tuple[str, ...], float]]:
    with server().database.sessions() as session:
        tasks = session.execute(select(Task.status, func.count()).group_by(Task.status)).all()
        rounds = session.execute(select(Round.status, func.count()).group_by(Round.status)).all()
    return {
        "fcp_tasks": {(f'status="{s.value}"',): float(n) for s, n in tasks},
        "fcp_rounds": {(f'status="{s.value}"',): float(n) for s, n in rounds},
    }


@blueprint.get("/metrics")
def metrics() -> Response:
    """Prometheus text exposition of this process's counters and the shared status gauges."""
    body = server().metrics.render(_status_gauges())
    return Response(body, content_type="text/plain; version=0.0.4; charset=utf-8")
