"""JSON Schemas of protobuf messages in the proto3 JSON mapping, for the OpenAPI description.

The wire module parses JSON bodies with `google.protobuf.json_format` and answers with
`MessageToJson`, so the schema of a message is derived from its descriptor, never written by
hand: a field added to a .proto shows up in /openapi.json at once. The mapping follows the
proto3 JSON spec (protobuf.dev/programming-guides/proto3#json): lowerCamelCase names, 64-bit
integers as decimal strings (numbers accepted), enums by name (numbers accepted), bytes as
base64, Timestamp as RFC 3339 and Duration as "<seconds>s". Unknown fields are refused by the
parser, hence `additionalProperties: false`; members of a oneof are mutually exclusive.
"""

from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

Schema = dict[str, Any]

_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT64 = (0, 2**64 - 1)
# Largest finite float32; json_format refuses larger values for `float` fields.
_FLOAT32_MAX = 3.4028234663852886e38
_NON_FINITE = ["NaN", "Infinity", "-Infinity"]
# What json_format's Timestamp parser takes: years 0001-9999, up to 9 fractional digits, and
# Z or a +hh:mm offset (date-time alone would also allow 0000, lowercase and leap seconds).
_TIMESTAMP_PATTERN = (
    r"^([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)-(0[1-9]|1[0-2])-"
    r"(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?"
    r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
_WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "pattern": _TIMESTAMP_PATTERN,
        "description": "RFC 3339 time, e.g. 2025-01-31T12:00:00Z.",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]{1,11}(\.[0-9]{1,9})?s$",
        "description": "Seconds with an `s` suffix, e.g. 1.5s.",
    },
}
_F = FieldDescriptor


def _integer(bounds: tuple[int, int], digits: int) -> Schema:
    low, high = bounds
    sign = "-?" if low < 0 else ""
    return {
        "anyOf": [
            {"type": "integer", "minimum": low, "maximum": high},
            # Stay one digit short of the type's width so every such string is in range.
            {"type": "string", "pattern": f"^{sign}[0-9]{{1,{digits}}}$"},
        ]
    }


def _number(max_abs: float | None) -> Schema:
    finite: Schema = {"type": "number"}
    if max_abs is not None:
        finite.update(minimum=-max_abs, maximum=max_abs)
    return {"anyOf": [finite, {"type": "string", "enum": _NON_FINITE}]}


_SCALARS: dict[int, Callable[[], Schema]] = {
    _F.TYPE_BOOL: lambda: {"type": "boolean"},
    _F.TYPE_STRING: lambda: {"type": "string"},
    _F.TYPE_BYTES: lambda: {
        "type": "string",
        "pattern": r"^[A-Za-z0-9+/_\-]*={0,2}$",
        "description": "base64",
    },
    _F.TYPE_INT32: lambda: {"type": "integer", "minimum": _INT32[0], "maximum": _INT32[1]},
    _F.TYPE_SINT32: lambda: {"type": "integer", "minimum": _INT32[0], "maximum": _INT32[1]},
    _F.TYPE_SFIXED32: lambda: {"type": "integer", "minimum": _INT32[0], "maximum": _INT32[1]},
    _F.TYPE_UINT32: lambda: {"type": "integer", "minimum": _UINT32[0], "maximum": _UINT32[1]},
    _F.TYPE_FIXED32: lambda: {"type": "integer", "minimum": _UINT32[0], "maximum": _UINT32[1]},
    _F.TYPE_INT64: lambda: _integer(_INT64, 18),
    _F.TYPE_SINT64: lambda: _integer(_INT64, 18),
    _F.TYPE_SFIXED64: lambda: _integer(_INT64, 18),
    _F.TYPE_UINT64: lambda: _integer(_UINT64, 19),
    _F.TYPE_FIXED64: lambda: _integer(_UINT64, 19),
    _F.TYPE_FLOAT: lambda: _number(_FLOAT32_MAX),
    _F.TYPE_DOUBLE: lambda: _number(None),
}


class SchemaSet:
    """Collects the schemas of messages and enums as OpenAPI components (shared via $ref)."""

    def __init__(self) -> None:
        self.components: dict[str, Schema] = {}

    def ref(self, descriptor: Descriptor) -> Schema:
        """A $ref to the message's schema, adding it (and what it uses) on first use."""
        if descriptor.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[descriptor.full_name])
        name = descriptor.full_name
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursive messages stop here
            self.components[name] = self._message(descriptor)
        return {"$ref": f"#/components/schemas/{name}"}

    def _enum(self, descriptor: EnumDescriptor) -> Schema:
        name = descriptor.full_name
        if name not in self.components:
            values = list(descriptor.values)
            self.components[name] = {
                "description": f"Enum {descriptor.full_name}: by name, or by number.",
                "enum": [v.name for v in values] + [v.number for v in values],
            }
        return {"$ref": f"#/components/schemas/{name}"}

    def _single(self, field: FieldDescriptor) -> Schema:
        if field.type in (_F.TYPE_MESSAGE, _F.TYPE_GROUP):
            return self.ref(field.message_type)
        if field.type == _F.TYPE_ENUM:
            return self._enum(field.enum_type)
        return _SCALARS[field.type]()

    def _field(self, field: FieldDescriptor) -> Schema:
        if field.label != _F.LABEL_REPEATED:
            return self._single(field)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key = entry.fields_by_name["key"]
            keys: Schema = {"type": "string"}
            if key.type != _F.TYPE_STRING:
                keys["pattern"] = (
                    r"^-?[0-9]{1,18}$" if key.type != _F.TYPE_BOOL else "^(true|false)$"
                )
            return {
                "type": "object",
                "propertyNames": keys,
                "additionalProperties": self._single(entry.fields_by_name["value"]),
            }
        return {"type": "array", "items": self._single(field)}

    def _message(self, descriptor: Descriptor) -> Schema:
        schema: Schema = {
            "type": "object",
            "description": f"Message {descriptor.full_name} (proto3 JSON).",
            "properties": {f.json_name: self._field(f) for f in descriptor.fields},
            "additionalProperties": False,
        }
        exclusive = [
            {"not": {"required": [a.json_name, b.json_name]}}
            for oneof in descriptor.oneofs
            for i, a in enumerate(oneof.fields)
            for b in oneof.fields[i + 1 :]
        ]
        if exclusive:
            schema["allOf"] = exclusive
        return schema
