"""A Redis that refuses writes (maxmemory reached under noeviction: "OOM command not allowed")
as the API sees it: a real redis-server with a tiny maxmemory and a real uvicorn. Every admission
route answers 503 with Retry-After, never a 500, and nothing is half-admitted: no job record, no
queue entry, no RQ job hash, no Idempotency-Key reservation. Reads keep working. Once memory is
freed, admission works again with no restart.
"""
from __future__ import annotations

import io

import pytest
from PIL import Image

from devkit.api_proc import ALICE, KEYS, ApiProc
from devkit.services import RedisServer

OK = {"prompt": "a yellow star", "size": "64x64", "steps": 2}


@pytest.fixture
def full_redis(cfg_model):
    redis = RedisServer().start()
    api = None
    try:
        api = ApiProc(redis.url, api_keys=KEYS, model=cfg_model, rate_limit_per_s=5,
                      rate_limit_burst=1000).start()
        yield redis, api
    finally:
        if api:
            api.stop()
        redis.stop()


def fill(r) -> int:
    """Junk keys until Redis refuses a write; returns how many were written."""
    import redis as redis_lib

    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 256 * 1024)
    n = 0
    while True:
        try:
            r.set(f"junk:{n}", b"x" * 4096)
        except redis_lib.exceptions.OutOfMemoryError:
            # refused once; memory can still dip just under the limit (freed buffers), which would
            # let a small admission through: put the limit well below what is used (noeviction
            # keeps every key and refuses every write)
            r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 64 * 1024)
            return n
        n += 1


def state(r) -> tuple:
    return (sorted(r.scan_iter(match="latentd:job:*")), sorted(r.scan_iter(match="rq:job:*")),
            r.llen("rq:queue:latentd"), sorted(r.scan_iter(match="latentd:idem:*")))


def test_redis_out_of_memory_503_and_nothing_half_admitted(full_redis):
    redis, api = full_redis
    r = redis.client()
    with api.client(ALICE) as c:
        first = c.post("/v1/jobs", json=OK)
        assert first.status_code == 202
        before = state(r)
        junk = fill(r)
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (9, 9, 9)).save(png, format="PNG")
        calls = [("json", "/v1/jobs", {"json": OK}),
                 ("json+key", "/v1/jobs", {"json": OK, "headers": {"Idempotency-Key": "oom-1"}}),
                 ("sync", "/v1/images/generations", {"json": OK}),
                 ("edit", "/v1/images/edits", {"data": {"prompt": "x", "steps": "2"},
                                               "files": {"image": ("a.png", png.getvalue())}})]
        for name, path, kw in calls:
            resp = c.post(path, **kw)
            print(f"  OOM ({junk} junk keys): {name} {path} -> {resp.status_code}")
            assert resp.status_code == 503, (name, resp.status_code, resp.text[:300])
            assert int(resp.headers["retry-after"]) >= 1
            assert resp.json()["error"]["code"] == "unavailable"
            assert "Traceback" not in resp.text
        assert state(r) == before                       # nothing half-admitted
        assert c.get(f"/v1/jobs/{first.json()['id']}").status_code == 200   # reads still work
        for k in r.scan_iter(match="junk:*", count=1000):
            r.delete(k)
        again = c.post("/v1/jobs", json=OK, headers={"Idempotency-Key": "oom-1"})
        assert again.status_code == 202, again.text        # no stale reservation left behind
