#!/usr/bin/env bash
# The ONE command that sets up and runs latentd on a fresh machine (bundled model, no downloads
# at run time, no Docker or Redis needed):  ./scripts/dev.sh [--port P] [--model PATH]
# Creates .venv if missing, installs torch 2.13.0  and latentd, then
# runs `latentd dev`: Redis + API + one worker; prints the URL and a curl command; Ctrl-C stops.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LATENTD_VENV:-.venv}   # another venv for the same command (the CI smoke check uses a fresh one)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY=$VENV/bin/python
if ! "$VPY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  # torch first and pinned: a looser spec lets pip pull a multi-GB CUDA build.
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -e .
exec "$VENV/bin/latentd" dev "$@"
