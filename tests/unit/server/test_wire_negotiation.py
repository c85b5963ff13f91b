"""Content negotiation of protobuf/JSON answers (`wire.wants_json`)."""

import flask
import pytest

from fcp_server.api import wire

PROTO, JSON = "application/x-protobuf", "application/json"


@pytest.mark.parametrize(
    ("accept", "content_type", "expected"),
    [
        (PROTO, JSON, False),  # an explicit Accept wins over the request's own format
        (JSON, PROTO, True),
        (None, JSON, True),  # no Accept: answer in the request's format
        (None, PROTO, False),
        ("", JSON, True),
        (f"{JSON};q=0.5, {PROTO}", JSON, False),  # a list is weighed
        (f"{PROTO};q=0.2, {JSON};q=0.9", PROTO, True),
        ("text/html", JSON, True),  # neither type accepted: the request's format
        ("text/html", PROTO, False),
        ("*/*", JSON, True),
    ],
)
def test_wants_json(accept, content_type, expected):
    headers = {"Content-Type": content_type}
    if accept is not None:
        headers["Accept"] = accept
    with flask.Flask(__name__).test_request_context("/", method="POST", headers=headers):
        assert wire.wants_json() is expected
