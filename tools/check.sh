#!/usr/bin/env bash
# The one check script, used by developers and by CI (.ci/run): sets up .venv when needed,
# then format check, lint, strict typing, import rules and the whole test suite.
#   tools/check.sh                 everything (what CI runs)
#   FCP_QUICK=1 tools/check.sh     skip the TensorFlow and slow tests
#   tools/check.sh -- ARGS         pass ARGS to pytest (e.g. -- tests/unit -x)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/bootstrap.sh
bin="$root/.venv/bin"

echo "== ruff format --check"
"$bin/ruff" format --check .
echo "== ruff check"
"$bin/ruff" check .
echo "== mypy --strict"
"$bin/mypy" fcp_server task_builder client_sim tools
echo "== import rules"
"$bin/lint-imports"

args=(-n "${FCP_TEST_WORKERS:-2}")
if [ "${FCP_QUICK:-0}" = 1 ]; then
  args+=(-m "not tf and not slow")
fi
if [ "${1:-}" = "--" ]; then
  shift
  args+=("$@")
fi
echo "== pytest ${args[*]}"
# pytest runs in a session of its own so that anything it started and left behind (TFF's
# worker_binary orphans, a stray server) is ended when it finishes.
sidfile="$(mktemp)"
set +e
setsid --wait bash -c 'echo $$ > "$0"; exec "$@"' "$sidfile" "$bin/pytest" "${args[@]}"
rc=$?
set -e
sid="$(cat "$sidfile")"
rm -f "$sidfile"
if [ -n "$sid" ] && pkill -KILL -s "$sid" 2>/dev/null; then
  echo "note: ended processes the test run left behind"
fi
exit "$rc"
