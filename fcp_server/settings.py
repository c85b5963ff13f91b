"""Deployment settings of the FCP server, read once from `FCP_*` environment variables.

The server's knobs (database and blob URLs, admin key, device auth, the worker loop and the
round timeouts) live in one frozen dataclass built at start-up and stored on the Flask app.
Timeout defaults follow the ODP Federated Compute server (local compute 15 min, upload 15
min; odp-federatedcompute `GcpParameterConfig`); the round deadline and retry bounds are ours,
because the reference has none and its rounds can stay stuck forever.
"""

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path

_ENVIRONMENTS = ("demo", "production")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
# Production's default per-token budget per minute: a device needs about five calls a round
# (check-in, plan, checkpoint, report, upload) plus rejected check-ins every 60-300 s.
PRODUCTION_RATE_LIMIT = 120


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Everything a server process (web or worker) needs to know about its deployment."""

    # "demo" (embedded, open, in-process worker) or "production" (auth required).
    environment: str = "demo"
    # SQLAlchemy URL: sqlite:///file.db or postgresql+psycopg://user@host/db.
    database_url: str = "sqlite:///fcp_server.db"
    # Blob store URL: file:///abs/dir or gs://bucket/prefix; empty means ./fcp-blobs.
    blob_url: str = ""
    # Admin API key for the task-management API; None leaves admin calls open (demo).
    admin_api_key: str | None = None
    # Whether devices must present an issued `odp-authorization-key` token.
    device_auth: bool = False
    # Run the background worker loop as a daemon thread inside the web process.
    embedded_worker: bool = True
    # Apply Alembic migrations when the app starts (demo convenience).
    auto_migrate: bool = True
    # Seconds between worker ticks.
    worker_interval_seconds: float = 1.0
    # Seconds between the worker's checks for rounds waiting to close, between two ticks
    # (one indexed query each); 0 = off (the default): rounds are closed when the upload
    # completing their goal rings the worker's doorbell (`storage.round_doorbell`), or at the
    # next tick should the ring be lost.
    worker_close_poll_seconds: float = 0.0
    # ASSIGNED longer than this becomes LOCAL_TIMEOUT (ODP: 15 min).
    local_compute_timeout_seconds: int = 900
    # LOCAL_COMPLETED longer than this becomes UPLOAD_TIMEOUT (ODP: 15 min).
    upload_timeout_seconds: int = 900
    # Seconds a round may collect when its plan does not say (ServerPlan.round_deadline_seconds).
    round_deadline_seconds: int = 3600
    # Attempts of one round before the task is failed.
    max_round_attempts: int = 3
    # Aggregation attempts of one round before it is failed.
    max_apply_attempts: int = 3
    # An APPLYING round untouched this long is considered abandoned by a crashed worker.
    apply_lease_seconds: int = 1800
    # Largest device upload accepted (compressed and uncompressed), bytes.
    max_upload_bytes: int = 64 * 1024 * 1024
    # Largest plan or checkpoint artifact accepted from the task builder, bytes.
    max_artifact_bytes: int = 512 * 1024 * 1024
    # Device tokens issued by `fcp-server tokens issue` expire after this many days.
    token_ttl_days: int = 7
    # Device API requests one token (or, without device auth, one client address) may make
    # per window, counted in the database so every web worker shares it; 0 = no limit (demo).
    rate_limit_requests: int = 0
    rate_limit_window_seconds: int = 60
    # Total time one blob-store call may take, retries included (GCS; local disk ignores it):
    # a hung store then fails the request with 503 instead of holding it.
    blob_timeout_seconds: float = 30.0
    # How long each web process reuses its read of a population's open rounds at check-in
    # (`services.round_cache`; the slot claim still decides); 0 = read them every check-in.
    checkin_round_cache_seconds: float = 0.5
    # "json" for structured one-line logs, "text" for people.
    log_format: str = "json"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.environment not in _ENVIRONMENTS:
            raise SettingsError(f"FCP_ENV must be one of {_ENVIRONMENTS}, got {self.environment!r}")
        if self.environment == "production":
            if not self.admin_api_key:
                raise SettingsError("FCP_ENV=production requires FCP_ADMIN_API_KEY to be set")
            if not self.device_auth:
                raise SettingsError("FCP_ENV=production requires FCP_DEVICE_AUTH to be on")
        if not self.database_url:
            raise SettingsError("FCP_DATABASE_URL must not be empty")
        if self.log_format not in ("json", "text"):
            raise SettingsError(f"FCP_LOG_FORMAT must be json or text, got {self.log_format!r}")
        positive = {
            "FCP_WORKER_INTERVAL_SECONDS": self.worker_interval_seconds,
            "FCP_LOCAL_COMPUTE_TIMEOUT_SECONDS": self.local_compute_timeout_seconds,
            "FCP_UPLOAD_TIMEOUT_SECONDS": self.upload_timeout_seconds,
            "FCP_ROUND_DEADLINE_SECONDS": self.round_deadline_seconds,
            "FCP_MAX_ROUND_ATTEMPTS": self.max_round_attempts,
            "FCP_MAX_APPLY_ATTEMPTS": self.max_apply_attempts,
            "FCP_APPLY_LEASE_SECONDS": self.apply_lease_seconds,
            "FCP_MAX_UPLOAD_BYTES": self.max_upload_bytes,
            "FCP_MAX_ARTIFACT_BYTES": self.max_artifact_bytes,
            "FCP_TOKEN_TTL_DAYS": self.token_ttl_days,
            "FCP_RATE_LIMIT_WINDOW_SECONDS": self.rate_limit_window_seconds,
            "FCP_BLOB_TIMEOUT_SECONDS": self.blob_timeout_seconds,
        }
        for name, value in positive.items():
            if value <= 0:
                raise SettingsError(f"{name} must be positive, got {value}")
        if not 0 <= self.worker_close_poll_seconds < self.worker_interval_seconds:
            raise SettingsError(
                "FCP_WORKER_CLOSE_POLL_SECONDS must be >= 0 (0 = off) and below "
                f"FCP_WORKER_INTERVAL_SECONDS, got {self.worker_close_poll_seconds}"
            )
        if not (
            math.isfinite(self.checkin_round_cache_seconds)
            and self.checkin_round_cache_seconds >= 0
        ):
            raise SettingsError(
                "FCP_CHECKIN_ROUND_CACHE_SECONDS must be >= 0 (0 = off), "
                f"got {self.checkin_round_cache_seconds}"
            )
        if self.rate_limit_requests < 0:
            raise SettingsError(
                f"FCP_RATE_LIMIT_REQUESTS must be >= 0 (0 = off), got {self.rate_limit_requests}"
            )

    @property
    def resolved_blob_url(self) -> str:
        """The blob URL, defaulting to an `fcp-blobs` directory in the working directory."""
        return self.blob_url or (Path.cwd() / "fcp-blobs").as_uri()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ServerSettings":
        """Builds settings from `FCP_*` variables; production flips the secure defaults."""
        source = os.environ if env is None else env
        environment = source.get("FCP_ENV", "demo").strip().lower()
        production = environment == "production"
        return cls(
            environment=environment,
            database_url=source.get("FCP_DATABASE_URL", cls.database_url),
            blob_url=source.get("FCP_BLOB_URL", ""),
            admin_api_key=source.get("FCP_ADMIN_API_KEY") or None,
            device_auth=_bool(source, "FCP_DEVICE_AUTH", production),
            embedded_worker=_bool(source, "FCP_EMBEDDED_WORKER", not production),
            auto_migrate=_bool(source, "FCP_AUTO_MIGRATE", not production),
            worker_interval_seconds=_float(source, "FCP_WORKER_INTERVAL_SECONDS", 1.0),
            worker_close_poll_seconds=_float(source, "FCP_WORKER_CLOSE_POLL_SECONDS", 0.0),
            local_compute_timeout_seconds=_int(source, "FCP_LOCAL_COMPUTE_TIMEOUT_SECONDS", 900),
            upload_timeout_seconds=_int(source, "FCP_UPLOAD_TIMEOUT_SECONDS", 900),
            round_deadline_seconds=_int(source, "FCP_ROUND_DEADLINE_SECONDS", 3600),
            max_round_attempts=_int(source, "FCP_MAX_ROUND_ATTEMPTS", 3),
            max_apply_attempts=_int(source, "FCP_MAX_APPLY_ATTEMPTS", 3),
            apply_lease_seconds=_int(source, "FCP_APPLY_LEASE_SECONDS", 1800),
            max_upload_bytes=_int(source, "FCP_MAX_UPLOAD_BYTES", cls.max_upload_bytes),
            max_artifact_bytes=_int(source, "FCP_MAX_ARTIFACT_BYTES", cls.max_artifact_bytes),
            token_ttl_days=_int(source, "FCP_TOKEN_TTL_DAYS", 7),
            rate_limit_requests=_int(
                source, "FCP_RATE_LIMIT_REQUESTS", PRODUCTION_RATE_LIMIT if production else 0
            ),
            rate_limit_window_seconds=_int(source, "FCP_RATE_LIMIT_WINDOW_SECONDS", 60),
            blob_timeout_seconds=_float(source, "FCP_BLOB_TIMEOUT_SECONDS", 30.0),
            checkin_round_cache_seconds=_float(
                source, "FCP_CHECKIN_ROUND_CACHE_SECONDS", cls.checkin_round_cache_seconds
            ),
            log_format=source.get("FCP_LOG_FORMAT", "json").strip().lower(),
            log_level=source.get("FCP_LOG_LEVEL", "INFO").strip().upper(),
        )


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name} must be a boolean (true/false), got {raw!r}")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from e


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from e
