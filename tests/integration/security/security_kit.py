"""Helpers of the security tests: device tokens and a blob store that records what it is asked."""

from typing import Any

from fcp_server.clock import Clock
from fcp_server.services import auth
from tests.integration.server.testkit import Api


class RecordingBlobs:
    """Delegates to a real blob store and records (method, name) of every call with a name."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self.inner, attr)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            name = args[0] if args else kwargs.get("name", kwargs.get("prefix"))
            if isinstance(name, str):
                self.calls.append((attr, name))
            return target(*args, **kwargs)

        return call


def issue_tokens(flask_app: Any, now: Clock, n: int) -> list[str]:
    """Issues `n` device tokens (stored hashed) and returns them."""
    database = flask_app.extensions["fcp"].database
    with database.sessions() as session, session.begin():
        return [auth.issue_token(session, now=now.now(), ttl_days=1) for _ in range(n)]


def device(flask_app: Any, token: str) -> Api:
    """An API driver that sends `token` as the device's `odp-authorization-key`."""
    return Api(flask_app.test_client(), {auth.DEVICE_TOKEN_HEADER: token})
