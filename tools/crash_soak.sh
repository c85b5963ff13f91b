#!/usr/bin/env bash
# Crash-recovery soak (issue 9, item 1): the crash campaign of
# tests/integration/reliability/test_crash_recovery.py with many more kill points.
#   tools/crash_soak.sh [REPEATS] [sqlite|postgres]
# Each of the 16 armed kill points is used REPEATS times (default 10) and 2 x REPEATS SIGKILLs
# land at random moments (10 -> 180 kill points) against gunicorn + `fcp-server worker`, on
# SQLite and PostgreSQL (or only the backend named). The figures are printed at the end.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/bootstrap.sh  # creates or reuses .venv (a no-op when it is up to date)
repeats="${1:-10}"
args=(tests/integration/reliability/test_crash_recovery.py -s -q -p no:cacheprovider)
if [ -n "${2:-}" ]; then
  args+=(-k "$2")
fi
# As in tools/check.sh: a session of its own, so nothing the campaign started can outlive it.
sidfile="$(mktemp)"
set +e
FCP_CRASH_REPEATS="$repeats" setsid --wait bash -c 'echo $$ > "$0"; exec "$@"' "$sidfile" \
  .venv/bin/pytest "${args[@]}"
rc=$?
set -e
sid="$(cat "$sidfile")"
rm -f "$sidfile"
if [ -n "$sid" ] && pkill -KILL -s "$sid" 2>/dev/null; then
  echo "note: ended processes the soak left behind"
fi
exit "$rc"
