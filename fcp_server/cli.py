"""`fcp-server` command line: serve, worker, db upgrade, tasks list/show/cancel, tokens issue.

Flags are parsed here and turned into `ServerSettings` straight away (everything else reads
the `FCP_*` environment). `serve` runs Flask's development server; production serves
`fcp_server.app:create_app()` with gunicorn (configs/gunicorn.conf.py) and runs `worker`
processes next to it. The server never runs TFF (it must not import TensorFlow or the task
builder), so unlike the builder's entry points it has no TFF worker process to reap.
"""

import argparse
import dataclasses
import sys
import threading
from collections.abc import Sequence

from google.protobuf import json_format

from fcp_server import errors, observability, worker
from fcp_server.aggregation import make_noise_rng
from fcp_server.clock import SystemClock
from fcp_server.services import auth, task_cancel, tasks
from fcp_server.services.plan_cache import PlanCache
from fcp_server.services.round_close import Deps
from fcp_server.settings import ServerSettings
from fcp_server.storage import db
from fcp_server.storage.blobs import make_blob_store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcp-server", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="overrides FCP_DATABASE_URL")
    parser.add_argument("--blob-url", help="overrides FCP_BLOB_URL")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="development HTTP server (Flask)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    run = commands.add_parser("worker", help="background loop: timeouts, deadlines, aggregation")
    run.add_argument("--once", action="store_true", help="run a single tick and exit")
    database = commands.add_parser("db", help="database schema")
    database.add_subparsers(dest="db_command", required=True).add_parser(
        "upgrade", help="apply Alembic migrations up to head"
    )
    task_cmd = commands.add_parser("tasks", help="inspect or cancel tasks")
    task_sub = task_cmd.add_subparsers(dest="tasks_command", required=True)
    listing = task_sub.add_parser("list")
    listing.add_argument("--population")
    for name in ("show", "cancel"):
        sub = task_sub.add_parser(name)
        sub.add_argument("population")
        sub.add_argument("task_id", type=int)
    token_cmd = commands.add_parser("tokens", help="device tokens")
    issue = token_cmd.add_subparsers(dest="tokens_command", required=True).add_parser("issue")
    issue.add_argument("--label", default="")
    issue.add_argument("--ttl-days", type=int)
    issue.add_argument(
        "--count", type=int, default=1, help="tokens to issue, one per line (one per device)"
    )
    return parser


def _settings(args: argparse.Namespace) -> ServerSettings:
    settings = ServerSettings.from_env()
    overrides = {"database_url": args.database_url, "blob_url": args.blob_url}
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v})


def _serve(settings: ServerSettings, args: argparse.Namespace) -> int:
    from fcp_server.app import create_app  # only this command needs the web app

    create_app(settings).run(host=args.host, port=args.port, threaded=True)
    return 0


def _worker(settings: ServerSettings, once: bool) -> int:
    database = db.connect(settings.database_url)
    deps = Deps(
        database=database,
        blobs=make_blob_store(settings.resolved_blob_url, timeout_s=settings.blob_timeout_seconds),
        clock=SystemClock(),
        settings=settings,
        plans=PlanCache(),
        rng_factory=make_noise_rng,
    )
    loop = worker.Worker(deps)
    if once:
        print(dataclasses.asdict(loop.tick()))
        return 0
    stop = threading.Event()
    try:
        loop.run(stop)
    except KeyboardInterrupt:
        stop.set()
    return 0


def _tasks(settings: ServerSettings, args: argparse.Namespace) -> int:
    database = db.connect(settings.database_url)
    with database.sessions() as session, session.begin():
        if args.tasks_command == "list":
            for row in tasks.list_tasks(session, args.population):
                print(
                    f"{row.population_name}\t{row.task_id}\t{row.kind.value}\t"
                    f"{row.status.value}\t{row.completed_iterations}/{row.total_iteration}\t"
                    f"eps={row.epsilon_spent:.4g}"
                )
            return 0
        if args.tasks_command == "show":
            row = tasks.get_task(session, args.population, args.task_id)
        else:
            row = task_cancel.cancel_task(
                session=session, pop=args.population, task_id=args.task_id, now=SystemClock().now()
            )
        print(json_format.MessageToJson(tasks.task_proto(row)))
    return 0


# Bounds one call; a fleet needs one token per device.
MAX_TOKENS_PER_CALL = 100_000


def _issue_token(settings: ServerSettings, args: argparse.Namespace) -> int:
    if not 1 <= args.count <= MAX_TOKENS_PER_CALL:
        print(f"--count must be in [1, {MAX_TOKENS_PER_CALL}]", file=sys.stderr)
        return 2
    database = db.connect(settings.database_url)
    with database.sessions() as session, session.begin():
        now = SystemClock().now()
        tokens = [
            auth.issue_token(
                session,
                now=now,
                label=args.label,
                ttl_days=args.ttl_days or settings.token_ttl_days,
            )
            for _ in range(args.count)
        ]
    print("\n".join(tokens))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fcp-server`; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        observability.configure_logging(settings.log_format, settings.log_level)
        if args.command == "serve":
            return _serve(settings, args)
        if args.command == "worker":
            return _worker(settings, args.once)
        if args.command == "db":
            db.upgrade_schema(settings.database_url)
            print(f"database at head: {db.redacted_url(settings.database_url)}")
            return 0
        if args.command == "tasks":
            return _tasks(settings, args)
        return _issue_token(settings, args)
    except (errors.FcpError, ValueError) as e:
        print(f"fcp-server: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
