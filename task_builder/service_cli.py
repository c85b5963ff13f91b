"""`task_builder`: serves the task-builder HTTP service (service.create_app) under gunicorn.

ODP ran its builder with Flask's development server on port 5000 (odp-federated-compute.md
section 1.3); this entry point keeps the port and runs gunicorn instead. Builds hold
TensorFlow state and take minutes, so the defaults are one synchronous worker and a long
timeout. The FCP server it registers tasks with comes from FCP_SERVER_URL / FCP_ADMIN_API_KEY.
"""

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from task_builder import service, tff_runtime


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    """Runs one Flask app with the given gunicorn options (no config file, no argv)."""

    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self._app = app
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the service's command line."""
    parser = argparse.ArgumentParser(prog="task_builder", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="0.0.0.0:5000", help="host:port to listen on")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a build may take")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Starts gunicorn with the task-builder app; returns when the server stops."""
    args = parse_args(argv)
    if args.workers <= 0 or args.timeout <= 0:
        print("--workers and --timeout must be positive", file=sys.stderr)
        return 2
    tff_runtime.install_reaper()
    try:
        app = service.create_app(service.ServiceSettings.from_env())
    except ValueError as e:
        print(f"bad settings: {e}", file=sys.stderr)
        return 2
    options = {"bind": args.bind, "workers": args.workers, "timeout": args.timeout}
    _Gunicorn(app, options).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
