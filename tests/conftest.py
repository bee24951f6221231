"""Shared pytest fixtures (see docs/CONTRACTS.md §4)."""
import os

import pytest

# No network in tests: huggingface_hub reads this at import, so set it before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A randomly initialised SD1-style diffusers folder (epsilon, with safety checker), built once."""
    from tests.tiny_model import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd1"), variant="sd1", safety=True, seed=0)


@pytest.fixture(scope="session")
def tiny_model_sd2(tmp_path_factory):
    """The SD2-style variant: v-prediction, linear projections, head dim instead of head count."""
    from tests.tiny_model import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd2"), variant="sd2", safety=True, seed=0)


@pytest.fixture
def redis_server():
    """A real redis-server on a free port with deploy/redis.conf (AOF), data in a temp dir;
    killed at the end. `.url`, `.client()`, `.kill()`, `.restart()` (same port and data)."""
    from tests.services import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
