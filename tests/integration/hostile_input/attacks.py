"""Hypothesis strategies for hostile uploads and reports, and what the server must answer.

An `UploadAttack` is a body (valid, corrupt, compressed badly, oversized...), its headers and
the assignment it is aimed at (live in any state, foreign, another population's, another
round's, malformed). `expected_upload` is the oracle: the status set the server may answer,
following the order in which the upload handler checks (id shape, Content-Type, size, the
assignment, the encoding, a replay, the update's contents).
"""

import gzip
import json
from dataclasses import dataclass

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from fcp_server import checkpoints
from fcp_server.aggregation import ClientUpdate
from fcp_server.protos import common_pb2, task_assignments_pb2
from tests.integration.hostile_input import live

OCTETS = "application/octet-stream"
# Where an attack is aimed (see `live.UploadWorld.target_path`).
LIVE_TARGETS = ("reported", "uploaded", "assigned", "stale")
DEAD_TARGETS = ("foreign", "other_population", "next_round", "previous_round_url")
TARGETS = (*LIVE_TARGETS, *DEAD_TARGETS, "malformed")
# Body kinds; "valid" and "huge" are well-formed updates, the rest must be refused.
VALID_KINDS = ("valid", "huge", "replay")
UPLOADED = live.UPLOADED
BODY_KINDS = (
    *VALID_KINDS,
    "truncated_gzip",
    "trailing_garbage_gzip",
    "gzip_bomb",
    "double_gzip",
    "random_bytes",
    "wrong_name",
    "wrong_shape",
    "wrong_dtype",
    "non_finite",
    "bad_num_examples",
    "missing_tensor",
    "oversized",
    "empty",
)
_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_SMALL = st.floats(-10, 10, allow_nan=False, width=32)
_HUGE_MIN = float(np.float32(1e30))
_F32_MAX = float(np.finfo(np.float32).max)
_HUGE = st.floats(_HUGE_MIN, _F32_MAX, width=32) | st.floats(-_F32_MAX, -_HUGE_MIN, width=32)


@dataclass(frozen=True)
class UploadAttack:
    """One hostile (or valid) upload request."""

    target: str
    kind: str
    # The bytes sent, and the update they decode to (None if they do not decode).
    body: bytes
    decoded: bytes | None
    content_type: str
    content_encoding: str | None


def _targets() -> st.SearchStrategy[str]:
    # Half aimed at a device that may upload, so bodies get as far as validation.
    return st.one_of(st.just("reported"), st.sampled_from(TARGETS))


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _tensors(draw: st.DrawFn, values: st.SearchStrategy[float]) -> dict[str, np.ndarray]:
    w = np.array(draw(st.lists(values, min_size=3, max_size=3)), np.float32).reshape(3, 1)
    b = np.array(draw(st.lists(values, min_size=1, max_size=1)), np.float32)
    update = ClientUpdate(
        trainable=(w, b),
        num_examples=draw(st.integers(0, 10_000)),
        metrics={"loss": (np.float32(draw(_SMALL)), np.float32(abs(draw(_SMALL)) + 1))},
    )
    return checkpoints.decode_tensors(checkpoints.encode_update(update), max_bytes=1 << 20)[0]


def _corrupt(draw: st.DrawFn, kind: str, tensors: dict[str, np.ndarray]) -> bytes:
    name = draw(st.sampled_from(sorted(tensors)))
    if kind == "wrong_name":
        new = draw(st.text(min_size=1, max_size=30).filter(lambda n: n not in tensors))
        tensors[new] = tensors.pop(name)
    elif kind == "wrong_shape":
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        if shape == tensors[name].shape:
            shape = (*shape, 2)
        tensors[name] = np.zeros(shape, tensors[name].dtype)
    elif kind == "wrong_dtype":
        dtype = draw(st.sampled_from(["float16", "float64", "int32", "int64", "uint8", "bool"]))
        if np.dtype(dtype) == tensors[name].dtype:
            dtype = "float16"
        tensors[name] = tensors[name].astype(dtype)
    elif kind == "non_finite":
        floats = [n for n, t in tensors.items() if t.dtype == np.float32]
        name = draw(st.sampled_from(sorted(floats)))
        flat = tensors[name].reshape(-1).copy()
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        tensors[name] = flat.reshape(tensors[name].shape)
    elif kind == "bad_num_examples":
        value = draw(
            st.integers(-(2**63), -1)
            | st.integers(checkpoints.DEFAULT_MAX_NUM_EXAMPLES + 1, 2**63 - 1)
        )
        tensors[checkpoints.NUM_EXAMPLES] = np.array(value, np.int64)
    elif kind == "missing_tensor":
        del tensors[name]
    return checkpoints.encode_tensors(tensors)


@st.composite
def upload_attacks(draw: st.DrawFn, kind: str, max_bytes: int) -> UploadAttack:
    """A hostile upload with a body of `kind`, for a server accepting `max_bytes`."""
    target = draw(_targets())
    tensors = _tensors(draw, _HUGE if kind == "huge" else _SMALL)
    valid = checkpoints.encode_tensors(tensors)
    compress = draw(st.booleans())
    decoded: bytes | None = valid
    if kind == "replay":
        raw = decoded = UPLOADED
    elif kind in VALID_KINDS:
        raw = valid
    elif kind == "truncated_gzip":
        packed = _gzip(valid)
        raw, decoded, compress = packed[: draw(st.integers(0, len(packed) - 1))], None, False
    elif kind == "trailing_garbage_gzip":
        raw, decoded = _gzip(valid) + draw(st.binary(min_size=1, max_size=64)), None
        compress = False
    elif kind == "gzip_bomb":
        size = draw(st.integers(max_bytes + 1, 8 * max_bytes))
        raw, decoded, compress = _gzip(b"\0" * size), None, False
    elif kind == "double_gzip":
        raw, decoded, compress = _gzip(_gzip(valid)), _gzip(valid), False
    elif kind == "random_bytes":
        raw = decoded = draw(st.binary(max_size=512))
    elif kind == "oversized":
        raw = decoded = valid + b"\0" * draw(st.integers(max_bytes, 2 * max_bytes))
        compress = False
    elif kind == "empty":
        raw = decoded = b""
    else:
        raw = decoded = _corrupt(draw, kind, tensors)
    gzipped = kind in ("truncated_gzip", "trailing_garbage_gzip", "gzip_bomb", "double_gzip")
    body = _gzip(raw) if compress else raw
    encoding = "gzip" if compress or gzipped else draw(st.sampled_from([None, "", "identity"]))
    if draw(st.integers(0, 9)) == 0:
        encoding = draw(st.sampled_from(["br", "deflate", "x-gzip", "gzip, gzip"]) | _HEADER_TEXT)
    content_type = OCTETS
    if draw(st.integers(0, 5)) == 0:
        content_type = draw(
            st.sampled_from(
                ["application/json", "application/x-protobuf", "text/plain", "", "octet-stream"]
            )
            | _HEADER_TEXT
        )
    elif draw(st.integers(0, 5)) == 0:
        content_type = draw(st.sampled_from([f"{OCTETS}; charset=binary", OCTETS.upper()]))
    return UploadAttack(target, kind, body, decoded, content_type, encoding)


def _media(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def expected_upload(attack: UploadAttack, max_bytes: int, uploaded: bytes) -> set[int]:
    """The statuses the server may answer to `attack` (in the handler's order of checks)."""
    if attack.target == "malformed":
        return {404}
    if _media(attack.content_type) != OCTETS:
        return {415}
    if len(attack.body) > max_bytes:
        return {413}
    if attack.target in DEAD_TARGETS:
        return {404}
    if attack.target in ("assigned", "stale"):
        return {409}
    encoding = (attack.content_encoding or "").strip().lower()
    if encoding not in ("", "identity", "gzip"):
        return {415}
    if encoding == "gzip" and attack.kind == "gzip_bomb":
        return {413}
    if encoding == "gzip" and attack.decoded is None:
        return {400}
    sent = attack.decoded if encoding == "gzip" else attack.body
    if attack.target == "uploaded":
        return {204} if sent == uploaded else {409}
    if len(sent or b"") > max_bytes:
        return {413}
    return {204} if attack.kind in VALID_KINDS and sent == attack.decoded else {400}


_Result = task_assignments_pb2.ReportResultRequest
_GZIP = common_pb2.RESOURCE_COMPRESSION_FORMAT_GZIP


@dataclass(frozen=True)
class ReportAttack:
    """One hostile (or valid) report-result request."""

    target: str
    body: bytes
    content_type: str


@st.composite
def report_attacks(draw: st.DrawFn) -> ReportAttack:
    """A report-result call with any result value, encoding and target."""
    target = draw(st.sampled_from(LIVE_TARGETS) | st.sampled_from(TARGETS))
    result = draw(st.sampled_from(list(_Result.Result.values())))
    if draw(st.integers(0, 3)) == 0:
        result = draw(st.integers(-(2**31), 2**31 - 1))
    message = _Result(result=result)
    if draw(st.booleans()):
        message.resource_capabilities.supported_compression_formats.append(_GZIP)
    form = draw(st.sampled_from(["binary", "json", "garbage", "empty"]))
    content_type = "application/json" if form == "json" else "application/x-protobuf"
    if form == "binary":
        body = message.SerializeToString()
    elif form == "json":
        body = json_format.MessageToJson(message).encode()
    elif form == "garbage":
        body = draw(st.binary(min_size=1, max_size=200))
    else:
        body = b""
    if draw(st.integers(0, 7)) == 0:
        content_type = draw(st.sampled_from(["text/plain", "application/xml", ""]) | _HEADER_TEXT)
    return ReportAttack(target, body, content_type)


_PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf", OCTETS, "")
_FINAL = {v for k, v in _Result.Result.items() if k != "UNKNOWN"}


def _result_as_parsed(body: bytes, media: str) -> int | None:
    """The result the server reads from the body, or None when the body does not parse."""
    message = _Result()
    try:
        if media == "application/json":
            value = json.loads(body.decode("utf-8"))
            if not isinstance(value, dict):
                return None
            json_format.ParseDict(value, message)
        else:
            message.ParseFromString(body)
    except (ValueError, json_format.ParseError, DecodeError):
        return None
    return message.result


def expected_report(attack: ReportAttack) -> set[int]:
    """The statuses the server may answer (parse, then locate, then the result's value)."""
    result: int | None = 0  # an empty body is an empty message, whatever its Content-Type
    if attack.body:
        media = _media(attack.content_type)
        if media not in (*_PROTOBUF_TYPES, "application/json"):
            return {415}
        result = _result_as_parsed(attack.body, media)
    if result is None:
        return {400}
    if attack.target in ("malformed", *DEAD_TARGETS):
        return {404}
    return {200} if result in _FINAL else {400}
