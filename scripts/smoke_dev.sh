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
fail() { echo "smoke_dev: $1"; tail -40 "$TMP/dev.log"; exit 1; }
for _ in $(seq 1 900); do
  kill -0 "$PID" 2>/dev/null || fail "scripts/dev.sh exited before the service was ready"
  grep -q "latentd is ready" "$TMP/dev.log" && break
  sleep 1
done
grep -q "latentd is ready" "$TMP/dev.log" || fail "not ready after 900 s"
URL=$(sed -n 's/^latentd is ready at \([^ ]*\).*/\1/p' "$TMP/dev.log")
# the curl that `latentd dev` printed, run as printed (with b64 so the image comes back inline)
CMD=$(sed -n '/^curl -s/,/response_format/p' "$TMP/dev.log" | sed 's/\\$//' | tr -d '\n' | sed 's/"url"/"b64_json"/')
eval "$CMD" >"$TMP/out.json" || fail "the printed curl failed"
python3 - "$TMP/out.json" <<'PY' || fail "no PNG in the answer"
import base64, json, sys
d = json.load(open(sys.argv[1]))
png = base64.b64decode(d["data"][0]["b64_json"])
assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:16]
print(f"smoke_dev: first image served ({len(png)} bytes PNG, seed {d['data'][0].get('seed')})")
PY
