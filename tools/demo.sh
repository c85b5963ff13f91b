#!/usr/bin/env bash
# The main job: trains a model with DP through the whole system on embedded defaults
# (SQLite, a local blob directory, a simulated fleet) and prints a summary.
# Usage: tools/demo.sh [--out DIR] [more options of tools/demo.py]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/bootstrap.sh
# The run gets a session of its own so that nothing it starts outlives this command.
sidfile="$(mktemp)"
set +e
setsid --wait bash -c 'echo $$ > "$0"; exec "$@"' "$sidfile" \
  "$root/.venv/bin/python" tools/demo.py "$@"
rc=$?
set -e
sid="$(cat "$sidfile")"
rm -f "$sidfile"
[ -n "$sid" ] && pkill -KILL -s "$sid" 2>/dev/null || true
exit "$rc"
