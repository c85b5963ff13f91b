"""The server installs and starts without TensorFlow: prove it on the real import graph."""

import importlib.metadata
import re
import subprocess
import sys

FORBIDDEN = ("tensorflow", "tensorflow_federated", "tensorflow_privacy", "keras", "jax")
FORBIDDEN_OURS = ("task_builder", "client_sim")

_PROBE = """
import importlib, pkgutil, sys
import fcp_server
for info in pkgutil.walk_packages(fcp_server.__path__, "fcp_server."):
    if ".migrations" in info.name:
        continue  # Alembic scripts run a migration when imported.
    importlib.import_module(info.name)
from fcp_server.app import create_app
loaded = sorted({name.split(".")[0] for name in sys.modules})
print("\\n".join(loaded))
"""


def test_importing_every_server_module_loads_no_tensorflow() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True, timeout=300
    ).stdout.split()
    assert "fcp_server" in out
    bad = [name for name in out if name in FORBIDDEN or name in FORBIDDEN_OURS]
    assert not bad, f"fcp_server imported {bad}"


def _requirement_names(dist: str, extras: frozenset[str]) -> set[str]:
    names = set()
    for req in importlib.metadata.requires(dist) or []:
        name, _, marker = req.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if extra and extra.group(1) not in extras:
            continue
        names.add(re.split(r"[\s\[<>=!~(]", name.strip(), maxsplit=1)[0].lower())
    return names


def test_server_install_needs_no_tensorflow() -> None:
    # Walk the installed dependency metadata of the base install (no extras).
    seen: set[str] = set()
    todo = ["fcp"]
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            todo.extend(_requirement_names(dist, frozenset()))
        except importlib.metadata.PackageNotFoundError:
            continue
    norm = {name.replace("_", "-") for name in seen}
    assert not {n for n in norm if n.startswith(("tensorflow", "jax", "keras"))}, sorted(norm)
    assert "flask" in norm and "sqlalchemy" in norm
