"""Device and admin authentication: issued bearer tokens (stored hashed) and the admin API key.

Devices send `odp-authorization-key: <token>` (ODP's header, section 2.3). ODP mints tokens
after Android key attestation; attestation is out of scope here, so tokens are issued by an
operator (`fcp-server tokens issue`) and, like ODP's AllowedAuthorizationToken rows, expire.
Only the SHA-256 of a token is stored, so a database leak does not leak usable tokens.
`Authenticator` is a small protocol so another scheme (attestation, OIDC) can be plugged in.
"""

import datetime as dt
import hashlib
import hmac
import secrets
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from fcp_server.storage.models import DeviceToken

DEVICE_TOKEN_HEADER = "odp-authorization-key"
ADMIN_KEY_HEADER = "x-api-key"
_MAX_TOKEN_CHARS = 256


def token_digest(token: str) -> str:
    """Hex SHA-256 of a token (what the database stores)."""
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator(Protocol):
    """Decides whether a device credential is acceptable."""

    def authenticate(self, session: Session, token: str | None, now: dt.datetime) -> bool:
        """True if the device may call the API."""
        ...


class OpenAuthenticator:
    """Accepts every device (the embedded demo)."""

    def authenticate(self, session: Session, token: str | None, now: dt.datetime) -> bool:
        """Always True."""
        return True


class TokenAuthenticator:
    """Accepts issued, unexpired, unrevoked tokens, looked up by their SHA-256."""

    def authenticate(self, session: Session, token: str | None, now: dt.datetime) -> bool:
        """True if `token` was issued, is not revoked and has not expired."""
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return False
        row = session.get(DeviceToken, token_digest(token))
        return row is not None and row.revoked_at is None and row.expires_at > now


def issue_token(session: Session, *, now: dt.datetime, ttl_days: int, label: str = "") -> str:
    """Creates a device token and stores its hash; returns the token (shown once).

    Raises:
        ValueError: If `ttl_days` is not positive.
    """
    if ttl_days <= 0:
        raise ValueError(f"ttl_days must be positive, got {ttl_days}")
    token = secrets.token_urlsafe(32)
    session.add(
        DeviceToken(
            token_sha256=token_digest(token),
            label=label[:200],
            created_at=now,
            expires_at=now + dt.timedelta(days=ttl_days),
        )
    )
    return token


def revoke_token(session: Session, token: str, *, now: dt.datetime) -> bool:
    """Revokes a token; False if it was unknown."""
    row = session.scalar(select(DeviceToken).where(DeviceToken.token_sha256 == token_digest(token)))
    if row is None:
        return False
    row.revoked_at = now
    return True


def admin_key_ok(configured: str | None, presented: str | None) -> bool:
    """Admin calls are open when no key is configured; else the key must match exactly."""
    if configured is None:
        return True
    return presented is not None and hmac.compare_digest(configured.encode(), presented.encode())
