"""Flex-op check: which select-TF ops a TFLite program needs and which client version has them.

ODP (`support_ops_utils.py`, `support_ops.csv`) lists the Flex ops of the client TFLite graph
with `tflite::flex::AddFlexOpsFromModel` and sets `Task.min_client_version` to the highest
allowlisted version among them. Here the flatbuffer is read with TFLite's Python schema: an
operator code `CUSTOM` whose custom code starts with "Flex" is a select-TF op; its custom
options (a FlexBuffer `[op name, NodeDef]`) give the NodeDef, from which TF's kernel registry
names the kernel. Versions compare numerically (ODP compared strings of equal length).
"""

import csv
import dataclasses
import pathlib
import re
import struct
from typing import Any

from flatbuffers import flexbuffers  # type: ignore[import-untyped]
from tensorflow.core.framework import node_def_pb2
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.python.util import _pywrap_kernel_registry

from task_builder.errors import ArtifactBuildError, FlexOpsError

FLEX_PREFIX = "Flex"
NO_VERSION = "0"
# The allowlist shipped with the repository (configs/ next to the package).
DEFAULT_ALLOWLIST = (
    pathlib.Path(__file__).resolve().parent.parent / "configs" / "flex_ops_allowlist.csv"
)
_VERSION_RE = re.compile(r"^[0-9]{1,18}$")
_OP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_MAX_ALLOWLIST_ROWS = 10_000


@dataclasses.dataclass(frozen=True)
class FlexOpsReport:
    """The Flex ops of one program and the client version they need."""

    flex_ops: list[str]  # TF op names, sorted
    min_client_version: str  # "0" when no Flex op (or the check was skipped)


def load_allowlist(path: str | pathlib.Path | None = None) -> dict[str, str]:
    """Reads `device_runtime_version,op` rows ('#' comments allowed) into {op: version}.

    An op listed under several versions needs only the lowest.

    Raises:
        ArtifactBuildError: The file is missing or a row is malformed.
    """
    path = pathlib.Path(path) if path is not None else DEFAULT_ALLOWLIST
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ArtifactBuildError(f"Cannot read the flex-op allowlist {path}: {e}") from e
    rows = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if len(rows) > _MAX_ALLOWLIST_ROWS:
        raise ArtifactBuildError(
            f"flex-op allowlist {path} has more than {_MAX_ALLOWLIST_ROWS} rows"
        )
    allowlist: dict[str, str] = {}
    for number, row in enumerate(csv.reader(rows), start=1):
        fields = [f.strip() for f in row]
        if len(fields) != 2 or not _VERSION_RE.match(fields[0]) or not _OP_RE.match(fields[1]):
            raise ArtifactBuildError(
                f"flex-op allowlist {path}: row {number} {row!r} is not `version,op`"
            )
        version, op = fields
        if op not in allowlist or int(version) < int(allowlist[op]):
            allowlist[op] = version
    return allowlist


def _kernel_name(custom_options: Any, op: str) -> str:
    """TF kernel class of a Flex op, from the NodeDef in its custom options (uint8 array)."""
    if custom_options is None or len(custom_options) == 0:
        return "<no NodeDef>"
    try:
        decoded = flexbuffers.Loads(bytes(custom_options))
        raw = decoded[1]
        node_def = node_def_pb2.NodeDef.FromString(
            raw if isinstance(raw, bytes) else raw.encode("latin-1")
        )
        node_def.device = "/device:CPU:0"
        kernel = _pywrap_kernel_registry.TryFindKernelClass(node_def.SerializeToString())
        return kernel.decode() if isinstance(kernel, bytes) else str(kernel)
    except (IndexError, TypeError, ValueError) as e:
        return f"<unreadable NodeDef for {op}: {e}>"


def list_custom_ops(tflite_model: bytes) -> tuple[dict[str, str], list[str]]:
    """Lists the custom ops of a TFLite flatbuffer.

    Args:
        tflite_model: The flatbuffer bytes.

    Returns:
        ({flex TF op name: kernel class}, sorted non-Flex custom op codes).

    Raises:
        ArtifactBuildError: The bytes are not a TFLite model.
    """
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite_model, 0))
    except (struct.error, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactBuildError(f"Cannot read the TFLite model: {e}") from e
    codes = model.operatorCodes or []
    flex: dict[str, str] = {}
    other: set[str] = set()
    for subgraph in model.subgraphs or []:
        for operator in subgraph.operators or []:
            code = codes[operator.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) != schema.BuiltinOperator.CUSTOM:
                continue
            name = (code.customCode or b"").decode("utf-8", "replace")
            if name.startswith(FLEX_PREFIX):
                op = name[len(FLEX_PREFIX) :]
                if op not in flex:
                    flex[op] = _kernel_name(operator.customOptions, op)
            else:
                other.add(name)
    return dict(sorted(flex.items())), sorted(other)


def check_flex_ops(tflite_model: bytes, allowlist: dict[str, str]) -> FlexOpsReport:
    """Checks a program's Flex ops against the allowlist.

    Returns:
        The sorted Flex ops and the highest version they need ("0" if none).

    Raises:
        FlexOpsError: Some Flex op is not allowlisted, or a non-Flex custom op is used;
            the message names every such op and its kernel.
    """
    flex, other = list_custom_ops(tflite_model)
    missing = {op: kernel for op, kernel in flex.items() if op not in allowlist}
    problems = []
    if missing:
        problems.append(f"Please contact the platform team to register these ops: {missing}")
    if other:
        problems.append(f"custom (non select-TF) ops are not supported on devices: {other}")
    if problems:
        raise FlexOpsError("Cannot build the ClientOnlyPlan: " + "; ".join(problems))
    versions = [int(allowlist[op]) for op in flex]
    return FlexOpsReport(sorted(flex), str(max(versions)) if versions else NO_VERSION)


def list_flex_ops(tflite_model: bytes) -> FlexOpsReport:
    """The Flex ops without a check (skip_flex_ops_check): min version stays "0"."""
    flex, _ = list_custom_ops(tflite_model)
    return FlexOpsReport(sorted(flex), NO_VERSION)
