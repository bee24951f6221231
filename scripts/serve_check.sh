#!/usr/bin/env bash
# Waits until a starting `latentd dev` (its output in LOG, its process PID) says it is ready, runs
# the curl it printed (asking for base64 so the image comes back inline) and checks that a PNG
# came back. Shared by the smoke checks of the README's run command and of the wheel.
#   bash scripts/serve_check.sh LOG PID NAME
set -euo pipefail
LOG=$1 PID=$2 NAME=$3
fail() { echo "$NAME: $1"; tail -40 "$LOG"; exit 1; }
for _ in $(seq 1 900); do
  kill -0 "$PID" 2>/dev/null || fail "latentd dev exited before the service was ready"
  grep -q "latentd is ready" "$LOG" && break
  sleep 1
done
grep -q "latentd is ready" "$LOG" || fail "not ready after 900 s"
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
CMD=$(sed -n '/^curl -s/,/response_format/p' "$LOG" | sed 's/\\$//' | tr -d '\n' | sed 's/"url"/"b64_json"/')
eval "$CMD" >"$OUT" || fail "the printed curl failed"
python3 - "$OUT" "$NAME" <<'PY' || fail "no PNG in the answer"
import base64, json, sys
d = json.load(open(sys.argv[1]))
png = base64.b64decode(d["data"][0]["b64_json"])
assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:16]
print(f"{sys.argv[2]}: first image served ({len(png)} bytes PNG, seed {d['data'][0].get('seed')})")
PY
