"""Plots a server's operations: check-ins per minute by result, round durations, rounds over time.

Reads the fleet activity of a time window either straight from the server's database (a
SQLAlchemy URL, opened read-only: SQLite `query_only`, PostgreSQL read-only transactions) or
from a running server's dashboard API (GET /dashboard/data.json, with the admin key when the
server has one), and writes one PNG per view. These are the operator's views ODP keeps in
Prometheus timers and Looker dashboards (odp-federated-compute.md section 3.1).

    python tools/plot_operations.py --database-url sqlite:///fcp_server.db --out plots
    python tools/plot_operations.py --server http://127.0.0.1:8080 --api-key KEY --out plots
"""

import argparse
import datetime as dt
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import httpx
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from fcp_server.services import dashboard
from fcp_server.services.dashboard import AssignmentBucket, Operations, RoundTiming

DEFAULT_WINDOW_MINUTES = 24 * 60
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# The same colours as the dashboard's chart (static/dashboard.js).
RESULT_COLORS = {
    "UPLOAD_COMPLETED": "#2ca02c",
    "ASSIGNED": "#1f77b4",
    "LOCAL_COMPLETED": "#17becf",
    "CANCELED": "#7f7f7f",
    "LOCAL_NOT_ELIGIBLE": "#bcbd22",
    "LOCAL_TIMEOUT": "#ff7f0e",
    "UPLOAD_TIMEOUT": "#8c564b",
}
FAILURE_COLOR = "#d62728"


def readonly_engine(url: str) -> Engine:
    """An engine that cannot write: SQLite with `query_only`, PostgreSQL read-only sessions.

    Raises:
        ValueError: The URL is not SQLite or PostgreSQL, or the SQLite file does not exist
            (opening it would create an empty database).
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or not pathlib.Path(parsed.database).is_file():
            raise ValueError(f"SQLite database file {parsed.database!r} does not exist")
        engine = create_engine(parsed, poolclass=NullPool)

        @event.listens_for(engine, "connect")
        def _query_only(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute("PRAGMA query_only=ON")

        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 is installed
        return create_engine(
            parsed,
            poolclass=NullPool,
            connect_args={"options": "-c default_transaction_read_only=on"},
        )
    raise ValueError(f"database URL must be sqlite:// or postgresql://, got {backend!r}")


def read_from_database(url: str, *, until: dt.datetime, window: dt.timedelta) -> Operations:
    """The operations of `(until - window, until]`, read with read-only queries."""
    engine = readonly_engine(url)
    try:
        with Session(engine) as session:
            return dashboard.operations(session, since=until - window, until=until)
    finally:
        engine.dispose()


def read_from_server(
    base_url: str,
    *,
    window_minutes: int,
    api_key: str | None = None,
    transport: httpx.BaseTransport | None = None,
) -> Operations:
    """The operations of the server's last `window_minutes`, from GET /dashboard/data.json.

    Raises:
        httpx.HTTPStatusError: The server answered with an error status.
        ValueError: The answer is too large or not a dashboard snapshot.
    """
    headers = {"x-api-key": api_key} if api_key else {}
    with httpx.Client(base_url=base_url, timeout=30.0, transport=transport) as client:
        response = client.get(
            "/dashboard/data.json", params={"window_minutes": window_minutes}, headers=headers
        )
        response.raise_for_status()
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise ValueError(f"data.json is larger than {MAX_RESPONSE_BYTES} bytes")
        payload = response.json()
    if not isinstance(payload, dict) or not isinstance(payload.get("operations"), dict):
        raise ValueError("data.json has no 'operations' object")
    return operations_from_json(payload["operations"])


def _time(value: Any, field: str) -> dt.datetime:
    if not isinstance(value, str):
        raise ValueError(f"operations field {field} must be an ISO time string, got {value!r}")
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"operations field {field} must carry a UTC offset, got {value!r}")
    return parsed


def _int(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"operations field {field} must be an integer, got {value!r}")
    return value


def _str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"operations field {field} must be a string, got {value!r}")
    return value


def operations_from_json(ops: dict[str, Any]) -> Operations:
    """Reads the `operations` object of data.json back into `dashboard.Operations`.

    Raises:
        ValueError: A field is missing or has the wrong type.
    """
    try:
        buckets = [
            AssignmentBucket(
                minute=_time(b["minute"], "minute"),
                result=_str(b["result"], "result"),
                count=_int(b["count"], "count"),
            )
            for b in ops["assignments_per_minute"]
        ]
        rounds = [
            RoundTiming(
                population=_str(r["population"], "population"),
                task_id=_int(r["task_id"], "task_id"),
                iteration_id=_int(r["iteration_id"], "iteration_id"),
                attempt=_int(r["attempt"], "attempt"),
                status=_str(r["status"], "status"),
                created_at=_time(r["created_at"], "created_at"),
                completed_at=None
                if r["completed_at"] is None
                else _time(r["completed_at"], "completed_at"),
            )
            for r in ops["rounds"]
        ]
        start, end = ops["window_start"], ops["window_end"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"operations object is malformed: {e!r}") from e
    return Operations(
        window_start=_time(start, "window_start"),
        window_end=_time(end, "window_end"),
        assignments=tuple(buckets),
        rounds=tuple(rounds),
    )


def _time_axis(ax: Any, label: str) -> None:
    # Concise labels pick the unit (seconds to days) from the span shown.
    # (matplotlib.dates has no type annotations, hence the ignores.)
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    ax.set_xlabel(label)


def _task_label(r: RoundTiming) -> str:
    return f"{r.population}/{r.task_id}"


def _completed(rounds: Iterable[RoundTiming]) -> dict[str, list[tuple[RoundTiming, dt.datetime]]]:
    """Completed rounds with their completion time, by task label."""
    by_task: dict[str, list[tuple[RoundTiming, dt.datetime]]] = {}
    for r in rounds:
        if r.status == "COMPLETED" and r.completed_at is not None:
            by_task.setdefault(_task_label(r), []).append((r, r.completed_at))
    return by_task


def _finish(fig: Any, ax: Any, path: pathlib.Path, empty: bool, what: str) -> pathlib.Path:
    if empty:
        ax.text(0.5, 0.5, f"no {what} in this window", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_assignments_per_minute(ops: Operations, path: pathlib.Path) -> pathlib.Path:
    """Stacked bars: check-ins per minute, split by the result of each assignment."""
    fig, ax = plt.subplots(figsize=(9, 4))
    minutes = sorted({b.minute for b in ops.assignments})
    bottom = dict.fromkeys(minutes, 0)
    for result in sorted({b.result for b in ops.assignments}):
        counts = {b.minute: b.count for b in ops.assignments if b.result == result}
        heights = [counts.get(m, 0) for m in minutes]
        color = RESULT_COLORS.get(result, FAILURE_COLOR)
        ax.bar(
            minutes,  # type: ignore[arg-type]  # matplotlib takes datetimes on a date axis
            heights,
            width=50 / 86400,  # matplotlib date units are days: 50 s bars, 10 s gaps
            bottom=[bottom[m] for m in minutes],
            align="edge",
            color=color,
            label=result,
        )
        for m, h in zip(minutes, heights, strict=True):
            bottom[m] += h
    _time_axis(ax, "minute (UTC)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("check-ins")
    ax.set_title("Check-ins per minute by result")
    return _finish(fig, ax, path, not minutes, "check-ins")


def plot_round_durations(ops: Operations, path: pathlib.Path) -> pathlib.Path:
    """Seconds from a completed round's start to its completion, by round, per task."""
    fig, ax = plt.subplots(figsize=(7, 4))
    by_task = _completed(ops.rounds)
    for label, rounds in sorted(by_task.items()):
        xs = [r.iteration_id for r, _ in rounds]
        ys = [(end - r.created_at).total_seconds() for r, end in rounds]
        ax.plot(xs, ys, marker="o", markersize=4, label=label)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("duration (s)")
    ax.set_title("Round duration")
    return _finish(fig, ax, path, not by_task, "completed rounds")


def plot_rounds_over_time(ops: Operations, path: pathlib.Path) -> pathlib.Path:
    """Cumulative completed rounds against wall-clock time, per task."""
    fig, ax = plt.subplots(figsize=(7, 4))
    by_task = _completed(ops.rounds)
    for label, rounds in sorted(by_task.items()):
        # The count starts at 0 when the task's first round in the window started.
        times = [min(r.created_at for r, _ in rounds), *sorted(end for _, end in rounds)]
        ax.step(times, range(len(times)), where="post", marker="o", label=label)  # type: ignore[arg-type]
    _time_axis(ax, "time (UTC)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("completed rounds")
    ax.set_title("Rounds over time")
    return _finish(fig, ax, path, not by_task, "completed rounds")


def plot_all(ops: Operations, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes the three PNGs into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_assignments_per_minute(ops, out_dir / "assignments_per_minute.png"),
        plot_round_durations(ops, out_dir / "round_duration.png"),
        plot_rounds_over_time(ops, out_dir / "rounds_over_time.png"),
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--database-url", help="the server's SQLAlchemy URL (read-only)")
    source.add_argument("--server", help="base URL of a running server, e.g. http://host:8080")
    parser.add_argument("--api-key", help="admin API key (with --server)")
    parser.add_argument(
        "--until",
        type=dt.datetime.fromisoformat,
        help="window end as ISO time with offset (with --database-url; default now)",
    )
    parser.add_argument(
        "--window-minutes",
        type=int,
        default=DEFAULT_WINDOW_MINUTES,
        help=f"window length in minutes (1..{int(dashboard.MAX_WINDOW.total_seconds()) // 60})",
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("plots"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = _parser()
    args = parser.parse_args(argv)
    window = dt.timedelta(minutes=args.window_minutes)
    if not dt.timedelta(minutes=1) <= window <= dashboard.MAX_WINDOW:
        parser.error(f"--window-minutes must be in 1..{dashboard.MAX_WINDOW} minutes")
    if args.until is not None and args.until.tzinfo is None:
        parser.error("--until needs a UTC offset, e.g. 2025-01-01T12:00:00+00:00")
    if args.server and args.until is not None:
        parser.error("--until only applies to --database-url (the server's clock ends the window)")
    if args.database_url:
        until = args.until or dt.datetime.now(dt.UTC)
        ops = read_from_database(args.database_url, until=until, window=window)
    else:
        ops = read_from_server(
            args.server, window_minutes=args.window_minutes, api_key=args.api_key
        )
    if not ops.assignments and not ops.rounds:
        print(
            f"no check-ins or rounds between {ops.window_start} and {ops.window_end}",
            file=sys.stderr,
        )
        return 1
    for path in plot_all(ops, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
