"""Shared pytest fixtures (see docs/CONTRACTS.md §4): models, redis-server, the API, workers."""
import os

import pytest

# No network in tests: huggingface_hub reads this at import, so set it before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A randomly initialised SD1-style diffusers folder (epsilon, with safety checker), built once."""
    from devkit.tiny_model import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd1"), variant="sd1", safety=True, seed=0)


@pytest.fixture(scope="session")
def tiny_model_sd2(tmp_path_factory):
    """The SD2-style variant: v-prediction, linear projections, head dim instead of head count."""
    from devkit.tiny_model import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd2"), variant="sd2", safety=True, seed=0)


@pytest.fixture(scope="session")
def tiny_model_inpaint(tmp_path_factory):
    """The SD1-style model with a 9-channel inpainting U-Net (no safety checker)."""
    from devkit.tiny_model import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_inpaint"), variant="sd1", safety=False, seed=1,
                        in_channels=9)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A randomly initialised SDXL diffusers folder (two text encoders, "text_time" added
    conditioning, transformer depth per level), built once."""
    from devkit.tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module on tiny models: fast and steady on a shared 2-core CPU
    (two OpenMP threads make the tiny model far slower; bit-identity holds with 2 as well)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model, one_thread):
    """The tiny SD1 model loaded once per module, safety checker on, one thread."""
    from latentd.model.pipeline import load_pipeline

    return load_pipeline(str(tiny_model), safety=True)


@pytest.fixture
def redis_server():
    """A real redis-server on a free port with deploy/redis.conf (AOF), data in a temp dir;
    killed at the end. `.url`, `.client()`, `.kill()`, `.restart()` (same port and data)."""
    from devkit.services import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stack(redis_server, tiny_model):
    """Workers on a fresh redis-server and the tiny model: start(**settings) -> WorkerProc (ready),
    client(**settings) -> JobClient, record(job_id) -> the job hash. Kills all at the end."""
    from latentd.config.settings import Settings
    from devkit.services import FAST, WorkerProc
    from latentd.jobs import keys
    from latentd.jobs.client import JobClient

    procs: list = []

    class Stack:
        redis = redis_server

        def start(self, wait=True, **settings):
            w = WorkerProc(redis_server.url, str(tiny_model), **{**FAST, **settings}).start()
            procs.append(w)
            return w.wait_ready() if wait else w

        def client(self, **over):
            return JobClient(redis_server.client(), Settings(redis_url=redis_server.url, **over))

        def record(self, job_id):
            return {k.decode(): v.decode() for k, v in
                    redis_server.client().hgetall(keys.job(job_id)).items()}

    try:
        yield Stack()
    finally:
        for w in procs:
            w.stop()


# One redis-server and one API (no worker) for the API test modules: process starts are the slow
# part of those tests. Tests that count queue entries read before/after; tests that need an empty
# database flush it first.
@pytest.fixture(scope="session")
def module_redis():
    from devkit.services import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cfg_model():
    """A folder with only the JSON configs the API validates against (devkit/api_proc.py)."""
    from devkit.api_proc import configs_only_model

    return configs_only_model()


@pytest.fixture(scope="session")
def api(module_redis, cfg_model):
    """A real uvicorn API with two keys (alice, bob), validating against a configs-only model
    folder; no worker."""
    from devkit.api_proc import KEYS, ApiProc

    proc = ApiProc(module_redis.url, api_keys=KEYS, model=cfg_model, rate_limit_per_s=0).start()
    try:
        yield proc
    finally:
        proc.stop()
