#!/usr/bin/env bash
# Soak variant of the load test (issue 9 item 2; not run in CI): the same server stack
# (gunicorn web workers, `fcp-server worker` processes, PostgreSQL, local blobs) and the same
# invariants as tests/integration/load, with more devices and rounds. Sizes come from
# FCP_LOAD_* variables (see LoadParams in tests/integration/load/test_load.py):
#   tools/load_soak.sh                                   2000 devices, 200 rounds
#   FCP_LOAD_ROUNDS=500 FCP_LOAD_TIME_SCALE=0.5 tools/load_soak.sh
#   tools/load_soak.sh --basetemp=/tmp/soak              keep the logs and blobs of the run
# Creates .venv if needed (tools/bootstrap.sh); needs PostgreSQL on
# FCP_TEST_PG_HOST:FCP_TEST_PG_PORT (default 127.0.0.1:5432).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/bootstrap.sh  # creates or reuses .venv (a no-op when it is up to date)
export FCP_LOAD_DEVICES="${FCP_LOAD_DEVICES:-2000}"
export FCP_LOAD_ROUNDS="${FCP_LOAD_ROUNDS:-200}"
export FCP_LOAD_TIME_LIMIT="${FCP_LOAD_TIME_LIMIT:-14400}"
# The test stops the servers and load processes it started, also on Ctrl-C.
exec .venv/bin/pytest tests/integration/load -m "postgres and slow" -s -p no:cacheprovider "$@"
