"""/openapi.json describes exactly the app's routes, and its JSON body schemas are honest."""

import re
import shutil

import pytest
import schemathesis
from flask import Response
from google.protobuf import json_format, message_factory
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core import NotSet

from fcp_server.api import openapi_routes
from fcp_server.api.openapi_routes import DOCUMENT_PATH

_IMPLICIT = {"HEAD", "OPTIONS"}  # Flask adds these to every rule


@pytest.fixture
def db_url(sqlite_template, tmp_path):
    """The description does not depend on the database: SQLite only."""
    path = tmp_path / "fcp.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


def _flask_operations(app) -> set[tuple[str, str]]:
    operations = set()
    for rule in app.url_map.iter_rules():
        template = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        operations |= {(method, template) for method in rule.methods - _IMPLICIT}
    return operations


def _described_operations(document) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }


def _mismatch(app):
    document = app.test_client().get(DOCUMENT_PATH).get_json()
    flask_ops, described = _flask_operations(app), _described_operations(document)
    return sorted(flask_ops - described), sorted(described - flask_ops)


def test_document_describes_every_route_and_nothing_else(app):
    undescribed, unrouted = _mismatch(app)

    assert undescribed == [], f"routes missing from the OpenAPI description: {undescribed}"
    assert unrouted == [], f"described operations the app does not serve: {unrouted}"


def test_an_undescribed_route_is_detected(app):
    app.add_url_rule("/debug/<int:n>", "debug", lambda n: Response(str(n)), methods=["DELETE"])

    undescribed, unrouted = _mismatch(app)

    assert undescribed == [("DELETE", "/debug/{n}")]
    assert unrouted == []


def test_path_parameters_match_the_templates(app):
    document = app.test_client().get(DOCUMENT_PATH).get_json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            declared = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
            assert declared == set(re.findall(r"{([^}]+)}", path)), (method, path)


def test_schemathesis_loads_every_operation(app):
    schema = schemathesis.openapi.from_wsgi(DOCUMENT_PATH, app)
    results = list(schema.get_all_operations())

    assert all(r.ok() for r in results)
    # Schemathesis leaves out the document's own path; the rest are all there.
    assert len(results) == len(openapi_routes.routes()) - 1


_PROTO_BODIES = [
    (route.method.upper(), route.path, route.body)
    for route in openapi_routes.routes()
    if route.body is not None and not isinstance(route.body, str)
]


@pytest.mark.parametrize(
    ("method", "path", "descriptor"), _PROTO_BODIES, ids=lambda v: getattr(v, "full_name", v)
)
def test_schema_conforming_json_bodies_parse_as_the_message(app, method, path, descriptor):
    """A positive JSON body must be a valid proto3 JSON message (else the schema lies)."""
    operation = schemathesis.openapi.from_wsgi(DOCUMENT_PATH, app)[path][method]
    message_class = message_factory.GetMessageClass(descriptor)
    parsed = []

    @settings(
        max_examples=60,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(GenerationMode.POSITIVE, media_type="application/json"))
    def check(case):
        if isinstance(case.body, NotSet):  # the body is optional
            return
        json_format.ParseDict(case.body, message_class())
        parsed.append(case.body)

    check()
    assert len(parsed) >= 10
