"""Wire formats: protobuf bodies in binary (application/x-protobuf) or proto3 JSON.

ODP's services speak binary protobuf; JSON (google.protobuf.json_format, the proto3 JSON
mapping) is accepted as well for people and scripts. A request body is parsed per its
Content-Type; the answer follows the request's Accept header, else the request's own format,
else binary protobuf.
"""

import json
from typing import Any, TypeVar

from flask import Response, request
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from fcp_server import errors
from fcp_server.api.bodies import read_body

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_PROTOBUF_ALIASES = (PROTOBUF, "application/protobuf", "application/octet-stream")
MAX_MESSAGE_BYTES = 1024 * 1024
M = TypeVar("M", bound=Message)


def _media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in a JSON object")
    return dict(pairs)


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    """The body as a JSON object, or BadRequest (json_format itself fails on some of these)."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
        # A lone surrogate escape ("\ud800") decodes but cannot be encoded again; the protobuf
        # runtime then fails with SystemError instead of a parse error.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as e:  # UnicodeError and JSONDecodeError included
        raise errors.BadRequest(f"body is not valid JSON for {name}: {e}") from e
    if not isinstance(value, dict):
        # json_format raises TypeError (a 500) for a top-level number, array or null.
        raise errors.BadRequest(f"a JSON {name} body must be an object, not {type(value).__name__}")
    return value


def parse(message_type: type[M], *, allow_empty: bool = True) -> M:
    """Parses the request body as `message_type` per its Content-Type.

    Raises:
        UnsupportedMediaType: Neither protobuf nor JSON.
        BadRequest: The body does not parse.
    """
    data = read_body(MAX_MESSAGE_BYTES)
    message = message_type()
    if not data:
        if allow_empty:
            return message
        raise errors.BadRequest(f"a {message_type.DESCRIPTOR.full_name} body is required")
    media = _media_type(request.headers.get("Content-Type"))
    if media == JSON:
        name = message_type.DESCRIPTOR.full_name
        try:
            json_format.ParseDict(_json_object(data, name), message)
        except json_format.ParseError as e:
            raise errors.BadRequest(f"body is not a valid JSON {name}: {e}") from e
        return message
    if media in _PROTOBUF_ALIASES or not media:
        try:
            message.ParseFromString(data)
        except DecodeError as e:
            raise errors.BadRequest(
                f"body is not a valid {message_type.DESCRIPTOR.full_name}: {e}"
            ) from e
        return message
    raise errors.UnsupportedMediaType(
        f"Content-Type {media!r} is not supported; use {PROTOBUF} or {JSON}"
    )


def wants_json() -> bool:
    """Whether the answer should be JSON: an explicit Accept wins, else the request's format."""
    raw = request.headers.get("Accept")
    # Devices send one of the two types or nothing: no need to parse a header list then.
    if raw in (PROTOBUF, JSON):
        return raw == JSON
    if not raw:
        return _media_type(request.headers.get("Content-Type")) == JSON
    accept = request.accept_mimetypes
    if any(value in (PROTOBUF, JSON) for value, _quality in accept):
        return accept.best_match([PROTOBUF, JSON]) == JSON
    return _media_type(request.headers.get("Content-Type")) == JSON


def respond(message: Message, status: int = 200) -> Response:
    """Serialises `message` per `wants_json()`."""
    if wants_json():
        body = json_format.MessageToJson(message, preserving_proto_field_name=False)
        return Response(body, status=status, mimetype=JSON)
    return Response(message.SerializeToString(), status=status, content_type=PROTOBUF)
