"""A real API process for tests: `uvicorn --factory latentd.app.main:app_from_env` on a free port with the
given LATENTD_* environment; waits for /healthz; `stop()` kills it (fixtures call it in finally)."""
from __future__ import annotations

import contextlib

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from devkit.services import ROOT, free_port


def api_env(redis_url: str, **settings) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTD_")}
    env.update({"LATENTD_REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                "LATENTD_SIGNING_SECRET": "test-signing-secret-0123456789",
                "LATENTD_KEYS_FILE": os.path.join(tempfile.gettempdir(), "latentd-no-such-keys.json")})
    for k, v in settings.items():
        env[f"LATENTD_{k.upper()}"] = str(v)
    return env


class ApiProc:
    def __init__(self, redis_url: str, argv: list[str] | None = None, port: int | None = None,
                 **settings):
        self.port = port or free_port()
        self.env = api_env(redis_url, **settings)
        self.argv = argv or [sys.executable, "-m", "uvicorn", "--factory", "latentd.app.main:app_from_env",
                             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.log = tempfile.NamedTemporaryFile(prefix="latentd-api-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, health: str = "/healthz") -> "ApiProc":
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + health, timeout=1).status_code < 500:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"API not up after {timeout}s:\n{self.output()}")

    def client(self, key: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 30), **kw)

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-6000:]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


# --- keys and helpers shared by the API tests (their fixtures live in tests/conftest.py) ---------
from latentd.app.auth import hash_key  # noqa: E402

ALICE, BOB = "ltd_test_alice_0123456789abcdef", "ltd_test_bob_0123456789abcdef"
KEYS = f"alice:{hash_key(ALICE)},bob:{hash_key(BOB)}"
SECRET = "test-signing-secret-0123456789"


def configs_only_model(folder: str | None = None) -> str:
    """A model folder with only the JSON configs the API validates against (no weights, no torch):
    native 64x64, sizes multiples of 16 up to 256 a side, at most 16384 pixels, 150 steps, the
    same limits as devkit/tiny_model.py's folder."""
    import json

    folder = folder or os.path.join(tempfile.mkdtemp(prefix="latentd-cfg-"), "cfg64")
    for sub, cfg in (("unet", {"block_out_channels": [32, 64], "sample_size": 8, "in_channels": 4}),
                     ("vae", {"block_out_channels": [32, 64, 64, 64]})):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        with open(os.path.join(folder, sub, "config.json"), "w") as f:
            json.dump(cfg, f)
    return folder


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    """Poll GET /v1/jobs/{id} until the job is terminal; fail the test past `timeout`."""
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not done: {job}")


def open_png(data: bytes):
    """The bytes are a PNG (magic checked) -> PIL image."""
    import io

    from PIL import Image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


def serve_argv(port: int, workers: int) -> list[str]:
    """The API as a user runs it: `latentd serve` with `workers` processes."""
    return [sys.executable, "-m", "latentd.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers)]


@contextlib.contextmanager
def service_stack(model: str, api_settings: dict | None = None, api_workers: int | None = None,
                  **worker_settings):
    """A whole service on loopback: a fresh redis-server, the API (keys alice and bob, no rate
    limit, unless api_settings say otherwise; with api_workers, `latentd serve --workers N`) and
    one ready `latentd worker` on `model`; all stopped on exit. Yields {"api": ApiProc, "worker":
    WorkerProc, "redis": RedisServer}."""
    from devkit.services import RedisServer, WorkerProc

    redis_srv = RedisServer().start()
    api = worker = None
    try:
        port = free_port()
        argv = serve_argv(port, api_workers) if api_workers else None
        api = ApiProc(redis_srv.url, argv=argv, port=port,
                      **{"api_keys": KEYS, "model": str(model), "rate_limit_per_s": 0,
                         **(api_settings or {})}).start()
        worker = WorkerProc(redis_srv.url, str(model), **worker_settings).start().wait_ready(180)
        yield {"api": api, "worker": worker, "redis": redis_srv}
    finally:
        if worker:
            worker.stop()
        if api:
            api.stop()
        redis_srv.stop()


@contextlib.contextmanager
def models_stack(models: str, worker_models: tuple[str, ...], unserved: tuple[str, ...] = ()):
    """A deployment of several models (LATENTD_MODELS=`models`): a fresh redis-server, the API
    and one `latentd worker --model ...` supervisor serving `worker_models` (NAME or NAME=PATH),
    ready when /readyz names exactly `unserved` as the models without a worker."""
    import httpx

    from devkit.services import RedisServer, WorkerProc, free_port, poll

    redis = RedisServer().start()
    api = worker = None
    try:
        api = ApiProc(redis.url, api_keys=KEYS, models=models, rate_limit_per_s=0).start()
        args = tuple(a for m in worker_models for a in ("--model", m))
        worker = WorkerProc(redis.url, None, models=models, worker_metrics_port=free_port(),
                            worker_heartbeat_s=0.5, args=args).start()

        def served():
            body = httpx.get(api.url + "/readyz", timeout=5).json()
            assert worker.alive(), worker.output()
            return body if body.get("no_workers") == list(unserved) else None
        poll(served, timeout=240, every=0.2)
        yield {"api": api, "redis": redis, "worker": worker}
    finally:
        if worker:
            worker.terminate()
            worker.stop()
        if api:
            api.stop()
        redis.stop()
