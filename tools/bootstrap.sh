#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv in .venv with every pinned dependency.
# Safe to re-run: it reinstalls only when pyproject.toml or tools/constraints.txt changed.
# Usage: tools/bootstrap.sh [server]   ("server" installs the TensorFlow-free server set only)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
flavour="${1:-full}"
venv="${FCP_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "FCP needs Python 3.11 (found $("$python" --version))" >&2; exit 1; }

# The dashboard test drives Debian's headless Chromium; install it once when it is missing
# (FCP_SKIP_APT=1 skips this on machines where apt is not ours to use).
if [ "$flavour" != server ] && [ "${FCP_SKIP_APT:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
      || echo "warning: could not install chromium; the dashboard browser test will fail" >&2
  fi
fi

stamp="$venv/.fcp-installed-$flavour"
want="$(cat pyproject.toml tools/constraints.txt tools/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if [ "$flavour" = server ]; then
  "${pip[@]}" install -c tools/constraints.txt -e ".[dev]"
else
  "${pip[@]}" install -c tools/constraints.txt -e ".[ml,tools,dev]"
  # TFF 0.87.0 pins jaxlib==0.4.14, which no registry serves, and google-vizier 0.1.11 pins
  # SQLAlchemy 1.4; both run fine on the constrained set above, so they go in without deps.
  "${pip[@]}" install --no-deps tensorflow-federated==0.87.0 google-vizier==0.1.11
fi
echo "$want" > "$stamp"
