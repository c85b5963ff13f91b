"""The OpenAPI 3.1 description of the server's HTTP API, served at GET /openapi.json.

The operations come from `openapi_routes` (one per Flask rule, checked against the URL map by
the tests). Protobuf bodies are described twice, as `wire` accepts them: binary
`application/x-protobuf` and the proto3 JSON mapping, whose schema is derived from the message
descriptor (`proto_schemas`), so fuzzers can build both well-formed and hostile bodies. Every
operation may answer the error document of `errors.error_body` with a 4XX status. Security
requirements include the no-credential alternative `{}`: the embedded demo runs with neither
an admin key nor device tokens, production requires both.
"""

from typing import Any

from flask import Blueprint, Response, jsonify
from google.protobuf.descriptor import Descriptor

from fcp_server.api import openapi_routes, proto_schemas, wire
from fcp_server.api.openapi_routes import DOCUMENT_PATH, OCTETS, Reply, Route
from fcp_server.services import auth

Schema = dict[str, Any]
VERSION = "3.1.0"
_BINARY: Schema = {"type": "string", "format": "binary"}

blueprint = Blueprint("openapi", __name__)

_ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "status", "message"],
            "properties": {
                "code": {"type": "integer", "minimum": 400, "maximum": 599},
                "status": {"type": "string", "pattern": "^[A-Z][A-Z_]*$"},
                "message": {"type": "string", "minLength": 1},
            },
        }
    },
}
_TIME_OR_NULL: Schema = {"type": ["string", "null"]}
_DASHBOARD: Schema = {
    "type": "object",
    "required": ["generated_at", "refresh_seconds", "populations", "tasks", "operations"],
    "properties": {
        "generated_at": _TIME_OR_NULL,
        "refresh_seconds": {"type": "integer"},
        "populations": {"type": "array", "items": {"type": "object"}},
        "tasks": {"type": "array", "items": {"type": "object"}},
        "operations": {
            "type": "object",
            "required": ["assignments_per_minute", "rounds"],
            "properties": {
                "window_start": _TIME_OR_NULL,
                "window_end": _TIME_OR_NULL,
                "assignments_per_minute": {"type": "array"},
                "rounds": {"type": "array"},
            },
        },
    },
}
_SECURITY_SCHEMES: Schema = {
    "adminKey": {"type": "apiKey", "in": "header", "name": auth.ADMIN_KEY_HEADER},
    "adminKeyQuery": {"type": "apiKey", "in": "query", "name": "key"},
    "deviceToken": {"type": "apiKey", "in": "header", "name": auth.DEVICE_TOKEN_HEADER},
}


def _content(
    body: Descriptor | str, schema: Schema | None, schemas: proto_schemas.SchemaSet
) -> Schema:
    if isinstance(body, Descriptor):
        return {wire.PROTOBUF: {"schema": _BINARY}, wire.JSON: {"schema": schemas.ref(body)}}
    if schema is None:
        schema = _BINARY if body == OCTETS else {"type": "string"}
    return {body: {"schema": schema}}


def _reply(reply: Reply, schemas: proto_schemas.SchemaSet) -> Schema:
    answer: Schema = {"description": reply.description}
    if reply.body is not None:
        answer["content"] = _content(reply.body, reply.schema, schemas)
    return answer


def _operation(route: Route, schemas: proto_schemas.SchemaSet) -> Schema:
    responses = {r.status: _reply(r, schemas) for r in route.replies}
    responses["4XX"] = {"$ref": "#/components/responses/Error"}
    if route.security == openapi_routes.DEVICE:  # device calls spend a per-token budget
        responses["429"] = {"$ref": "#/components/responses/RateLimited"}
    operation: Schema = {
        "operationId": _operation_id(route),
        "summary": route.summary,
        "tags": [route.tag],
        "parameters": list(route.params),
        "responses": responses,
    }
    if route.body is not None:
        operation["requestBody"] = {
            "required": route.body_required,
            "content": _content(route.body, None, schemas),
        }
    if route.security:
        operation["security"] = list(route.security)
    return operation


def _operation_id(route: Route) -> str:
    words = [route.method, *route.path.replace(":", "/").split("/")]
    return "_".join(w.strip("{}").replace("-", "_").replace(".", "_") for w in words if w)


def document() -> Schema:
    """The OpenAPI document of every route in `openapi_routes.routes()`."""
    schemas = proto_schemas.SchemaSet()
    paths: dict[str, dict[str, Schema]] = {}
    for route in openapi_routes.routes():
        paths.setdefault(route.path, {})[route.method] = _operation(route, schemas)
    return {
        "openapi": VERSION,
        "info": {
            "title": "FCP federated compute server",
            "version": "1",
            "description": (
                "Task management (the task builder's side), the device protocol (check-in, "
                "report-result, upload, downloads), operations and the dashboard. Protobuf "
                "bodies are accepted as binary application/x-protobuf or as proto3 JSON; "
                "answers follow the Accept header, else the request's own format."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {**schemas.components, "Error": _ERROR, "DashboardSnapshot": _DASHBOARD},
            "responses": {
                "Error": {
                    "description": "The request was refused; the message says why.",
                    "content": {wire.JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
                "RateLimited": {
                    "description": "The caller's request budget (FCP_RATE_LIMIT_REQUESTS per "
                    "window) is spent; retry after Retry-After seconds.",
                    "headers": {
                        "Retry-After": {
                            "description": "Seconds until the current window ends.",
                            "required": True,
                            "schema": {"type": "integer", "minimum": 1},
                        }
                    },
                    "content": {wire.JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            },
            "securitySchemes": _SECURITY_SCHEMES,
        },
    }


@blueprint.get(DOCUMENT_PATH)
def openapi_json() -> Response:
    """The OpenAPI description (public: it holds no data)."""
    return jsonify(document())
