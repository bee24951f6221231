#!/usr/bin/env bash
# latentd as a user installs it: a wheel built from this repository, installed into a fresh venv
# and run from a folder outside the source tree (nothing of the repository on the path). Checks
# that only `latentd` lands at the top of site-packages, that `latentd generate` draws with the
# bundled model (package data) and that `latentd dev` serves an image. Used by .ci/run.
#   bash scripts/smoke_wheel.sh [port]
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
PORT=${1:-18766}
TMP=$(mktemp -d)
PID=""
cleanup() { [ -z "$PID" ] || { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }; rm -rf "$TMP"; }
trap cleanup EXIT
"${PYTHON:-python3}" -m venv "$TMP/venv"
VPY=$TMP/venv/bin/python
"$VPY" -m pip install -q torch==2.13.0          # pinned first: a looser spec pulls a CUDA build
"$VPY" -m pip wheel -q --no-deps -w "$TMP/dist" "$SRC"
"$VPY" -m pip install -q "$TMP"/dist/latentd-*.whl
mkdir "$TMP/run" && cd "$TMP/run"
env -u PYTHONPATH "$VPY" - <<'PY'
import importlib.metadata as md, importlib.util, os
files = md.distribution("latentd").files
tops = sorted({f.parts[0] for f in files if not f.parts[0].endswith((".dist-info", ".data")) and f.parts[0] != ".."})
assert tops == ["latentd"], f"site-packages gets {tops}, want only latentd"
for name in ("app", "worker", "model", "config", "jobs"):
    assert importlib.util.find_spec(name) is None, f"a top-level {name!r} is importable"
import latentd.model.info as info
assert os.path.isfile(os.path.join(info.BUNDLED, "unet", "diffusion_pytorch_model.safetensors")), info.BUNDLED
assert "site-packages" in info.BUNDLED, info.BUNDLED
print(f"smoke_wheel: site-packages holds only latentd; bundled model at {info.BUNDLED}")
PY
env -u PYTHONPATH "$TMP/venv/bin/latentd" generate "a red square on a white background" --out square.png --seed 1
"$VPY" -c "import sys; d = open('square.png', 'rb').read(); assert d[:8] == b'\x89PNG\r\n\x1a\n'; print(f'smoke_wheel: latentd generate wrote a {len(d)} byte PNG')"
env -u PYTHONPATH "$TMP/venv/bin/latentd" dev --port "$PORT" --data "$TMP/data" >"$TMP/dev.log" 2>&1 &
PID=$!
bash "$SRC/scripts/serve_check.sh" "$TMP/dev.log" "$PID" smoke_wheel
