"""Security test fixtures: the server test kit's app on SQLite and PostgreSQL, and tokens."""

from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.security.security_kit import issue_tokens
from tests.integration.server.conftest import (  # noqa: F401  (fixtures these tests use)
    api,
    app,
    blobs,
    clock,
    ctx,
    make_app,
    settings,
    worker,
)


@pytest.fixture
def tokens(clock) -> Callable[..., list[str]]:  # noqa: F811  (the imported fixture)
    """Issues device tokens on an app: `tokens(app, n=1)`."""

    def issue(flask_app: Any, n: int = 1) -> list[str]:
        return issue_tokens(flask_app, clock, n)

    return issue
