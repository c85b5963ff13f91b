"""Monitoring dashboard: GET /dashboard (HTML) and GET /dashboard/data.json (the snapshot).

The operator's view of the server (what ODP watches in its Looker dashboards,
odp-federated-compute.md section 3.1): populations, tasks and their status, the current
round's progress (assigned / reported / goal), epsilon spent, and per-task metric charts by
round. The page is rendered on the server (autoescaped Jinja, readable without JavaScript);
`static/dashboard.js` then polls data.json and redraws the tables and SVG charts itself, so
the page needs no network resource beyond this server. Read-only: GET only. When the server
has an admin API key, the page and its data need it (header x-api-key or ?key=), as the
task-management API does; the script and stylesheet carry no data and are public.
"""

import datetime as dt
import math
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, render_template, request

from fcp_server import errors
from fcp_server.api.context import db_session, server
from fcp_server.services import auth, dashboard

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
# Seconds between the page's polls of data.json.
REFRESH_SECONDS = 5
DEFAULT_WINDOW_MINUTES = 60
MAX_WINDOW_MINUTES = int(dashboard.MAX_WINDOW.total_seconds()) // 60
# The page loads only its own script and stylesheet and talks only to this server; the key
# may sit in the page URL, so it must never leak through a Referer header.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

blueprint = Blueprint(
    "dashboard",
    __name__,
    url_prefix="/dashboard",
    template_folder=str(_PACKAGE_DIR / "templates"),
    static_folder=str(_PACKAGE_DIR / "static"),
    static_url_path="/static",
)


@blueprint.before_request
def _require_admin_key() -> None:
    if request.endpoint == "dashboard.static":
        return
    presented = request.headers.get(auth.ADMIN_KEY_HEADER) or request.args.get("key")
    if not auth.admin_key_ok(server().settings.admin_api_key, presented):
        raise errors.Unauthenticated("a valid admin API key is required (header x-api-key)")


@blueprint.after_request
def _secure(response: Response) -> Response:
    response.headers.update(_SECURITY_HEADERS)
    if request.endpoint != "dashboard.static":
        response.headers["Cache-Control"] = "no-store"
    return response


def _window() -> dt.timedelta:
    raw = request.args.get("window_minutes", str(DEFAULT_WINDOW_MINUTES))
    try:
        minutes = int(raw)
    except ValueError as e:
        raise errors.BadRequest(f"window_minutes must be an integer, got {raw[:40]!r}") from e
    if not 1 <= minutes <= MAX_WINDOW_MINUTES:
        raise errors.BadRequest(f"window_minutes must be in 1..{MAX_WINDOW_MINUTES}, got {minutes}")
    return dt.timedelta(minutes=minutes)


def _current_json() -> dict[str, Any]:
    ctx, session = server(), db_session()
    with session.begin():
        snap = dashboard.snapshot(session, now=ctx.clock.now(), window=_window())
    return snapshot_json(snap)


@blueprint.get("")
def page() -> str:
    """The dashboard page, filled with the current snapshot."""
    return render_template("dashboard.html", data=_current_json())


@blueprint.get("/data.json")
def data() -> Response:
    """The current snapshot as JSON (what the page polls)."""
    return jsonify(_current_json())


def _time(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat()


def _finite(value: float | None) -> float | None:
    # JSON has no NaN or Infinity (the browser's JSON.parse rejects them): send null.
    return value if value is not None and math.isfinite(value) else None


def _round_json(r: dashboard.RoundProgress | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "iteration_id": r.iteration_id,
        "attempt": r.attempt,
        "status": r.status,
        "assigned": r.assigned,
        "active": r.active,
        "reported": r.reported,
        "goal": r.goal,
        "capacity": r.capacity,
        "created_at": _time(r.created_at),
        "deadline_at": _time(r.deadline_at),
    }


def _task_json(t: dashboard.TaskView) -> dict[str, Any]:
    return {
        "population": t.population,
        "task_id": t.task_id,
        "kind": t.kind,
        "status": t.status,
        "status_reason": t.status_reason,
        "total_iterations": t.total_iterations,
        "completed_iterations": t.completed_iterations,
        "report_goal": t.report_goal,
        "epsilon_spent": _finite(t.epsilon_spent),
        "target_epsilon": _finite(t.target_epsilon),
        "created_at": _time(t.created_at),
        "current_round": _round_json(t.current_round),
        "metrics": [
            {"name": s.name, "points": [[i, _finite(v)] for i, v in s.points]} for s in t.metrics
        ],
    }


def operations_json(ops: dashboard.Operations) -> dict[str, Any]:
    """The JSON form of `dashboard.Operations` (read back by tools/plot_operations.py)."""
    return {
        "window_start": _time(ops.window_start),
        "window_end": _time(ops.window_end),
        "assignments_per_minute": [
            {"minute": _time(b.minute), "result": b.result, "count": b.count}
            for b in ops.assignments
        ],
        "rounds": [
            {
                "population": r.population,
                "task_id": r.task_id,
                "iteration_id": r.iteration_id,
                "attempt": r.attempt,
                "status": r.status,
                "created_at": _time(r.created_at),
                "completed_at": _time(r.completed_at),
            }
            for r in ops.rounds
        ],
    }


def snapshot_json(snap: dashboard.Snapshot) -> dict[str, Any]:
    """The JSON form of a dashboard snapshot (the body of GET /dashboard/data.json)."""
    return {
        "generated_at": _time(snap.generated_at),
        "refresh_seconds": REFRESH_SECONDS,
        "populations": [
            {"name": p.name, "tasks_by_status": dict(p.tasks_by_status)} for p in snap.populations
        ],
        "tasks": [_task_json(t) for t in snap.tasks],
        "operations": operations_json(snap.operations),
    }
