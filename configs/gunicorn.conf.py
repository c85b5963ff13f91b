"""Gunicorn settings for the FCP server: `gunicorn -c configs/gunicorn.conf.py`.

Any number of workers (and hosts) may serve the same database and bucket, since all round
state lives in the database. Run the schema migration (`fcp-server db upgrade`) and the
background loop (`fcp-server worker`) as their own processes; the web workers here only serve
HTTP unless FCP_EMBEDDED_WORKER says otherwise.
"""

import os

from fcp_server import observability
from fcp_server.settings import ServerSettings

wsgi_app = "fcp_server.app:create_app()"
bind = os.environ.get("FCP_BIND", "0.0.0.0:8080")
workers = int(os.environ.get("FCP_WEB_WORKERS", "4"))
threads = int(os.environ.get("FCP_WEB_THREADS", "4"))
worker_class = "gthread"
# Uploads of large updates on slow device links need more than gunicorn's 30 s default.
timeout = int(os.environ.get("FCP_WEB_TIMEOUT", "120"))
graceful_timeout = 30
keepalive = 5
# Workers must not each run migrations: `fcp-server db upgrade` does it once.
raw_env = ["FCP_AUTO_MIGRATE=" + os.environ.get("FCP_AUTO_MIGRATE", "false")]
accesslog = "-"

_settings = ServerSettings.from_env({**os.environ, "FCP_AUTO_MIGRATE": "false"})
observability.configure_logging(_settings.log_format, _settings.log_level)
