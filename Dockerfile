# syntax=docker/dockerfile:1.4
# latentd images: two targets of one file, both non-root, both with a HEALTHCHECK and the
# bundled model (models/shapes) inside.
#
#   docker build --target api    -t latentd-api .       # slim: no torch (the API never imports it)
#   docker build --target worker -t latentd-worker .    # CPU torch (default)
#
# A CUDA worker: a CUDA runtime base and the matching torch wheels, e.g.
#   docker build --target worker -t latentd-worker:cuda \
#     --build-arg WORKER_BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
# Real weights: mount a diffusers folder or *.safetensors read-only and set LATENTD_MODEL to its
# path (e.g. -v /srv/models/sd15:/models/sd15:ro -e LATENTD_MODEL=/models/sd15), or name a hub
# id with HF_HUB_OFFLINE=0 and a volume at /home/latentd/.cache/huggingface (the only download).
ARG API_BASE=python:3.11-slim
ARG WORKER_BASE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${API_BASE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deploy/api_requirements.py ./deploy/
# the package's dependencies minus the engine's ([tool.latentd] engine-only), plus the S3 store
RUN python deploy/api_requirements.py s3 > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY app ./app
COPY worker ./worker
COPY model ./model
COPY training ./training
COPY config ./config
COPY jobs ./jobs
COPY latentd ./latentd
COPY models ./models
# --no-deps: torch & co. stay out. Editable: code runs from /app, so models/shapes is found.
RUN pip install --no-cache-dir --no-deps -e . \
 && useradd --uid 10001 --create-home latentd
USER 10001
EXPOSE 8000 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["latentd", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
FROM ${WORKER_BASE} AS worker
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH
# CUDA base images bring no Python: install one; every base gets its own venv
RUN if ! command -v python3 >/dev/null 2>&1; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv
WORKDIR /app
# torch first and pinned, from the chosen index (a loose spec pulls a multi-GB CUDA build)
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY model ./model
COPY training ./training
COPY config ./config
COPY jobs ./jobs
COPY latentd ./latentd
COPY models ./models
COPY deploy/redis.conf ./deploy/redis.conf
RUN pip install --no-cache-dir -e '.[s3]' \
 && useradd --uid 10001 --create-home latentd
USER 10001
EXPOSE 9101
# /metrics answers once the model is loaded; the probe also fails on a stalled main loop
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-m", "latentd.worker.probe"]
# SIGTERM: finish or hand back the batch within LATENTD_WORKER_GRACE_S (stop_grace_period above it)
STOPSIGNAL SIGTERM
CMD ["latentd", "worker"]
