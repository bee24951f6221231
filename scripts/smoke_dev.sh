#!/usr/bin/env bash
# The README's run command, checked as a new user meets it: scripts/dev.sh in a FRESH venv with
# only the runtime dependencies (no test extras), until the first image is served over HTTP.
# A runtime import that only the test extras provide fails here. Used by .ci/run.
#   bash scripts/smoke_dev.sh [port]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${1:-18765}
TMP=$(mktemp -d)
LATENTD_VENV=$TMP/venv ./scripts/dev.sh --port "$PORT" >"$TMP/dev.log" 2>&1 &
PID=$!
cleanup() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
bash scripts/serve_check.sh "$TMP/dev.log" "$PID" smoke_dev
