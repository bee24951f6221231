"""Admission control and observability against a real uvicorn + redis-server: rate limit (429 +
Retry-After), queue cap (503 + Retry-After), nothing enqueued on rejection, sync-wait 504,
/metrics names and token, /readyz without a worker or without Redis, CORS."""

import httpx
import pytest

from devkit.api_proc import ALICE, BOB, KEYS, ApiProc
from devkit.services import free_port
from latentd.jobs import keys

OK = {"prompt": "a green triangle", "size": "64x64"}
QUEUE = keys.rq_queue("latentd")


@pytest.fixture(scope="module")
def limited(module_redis, cfg_model):
    proc = ApiProc(module_redis.url, api_keys=KEYS, model=cfg_model, rate_limit_per_s=0.05,
                   rate_limit_burst=3, queue_cap=4, metrics_token="metrics-token",
                   cors_origins="https://app.example", sync_wait_s=0.5).start()
    try:
        yield proc
    finally:
        proc.stop()


def test_over_the_rate_limit_429_with_retry_after(limited, module_redis):
    r = module_redis.client()
    r.flushdb()
    with limited.client(ALICE) as alice, limited.client(BOB) as bob:
        codes = [alice.post("/v1/jobs", json=OK).status_code for _ in range(3)]
        assert codes == [202, 202, 202]
        over = alice.post("/v1/jobs", json=OK)
        assert over.status_code == 429, over.text
        assert int(over.headers["retry-after"]) >= 1
        assert over.json()["error"]["code"] == "rate_limited"
        assert r.llen(QUEUE) == 3                                  # the 429 enqueued nothing
        # n images cost n tokens: bob (a fresh bucket of 3) cannot take 4 at once... n cap is 4
        assert bob.post("/v1/jobs", json={**OK, "n": 2}).status_code == 202
        assert bob.post("/v1/jobs", json={**OK, "n": 2}).status_code == 429


def test_queue_full_503_with_retry_after(limited, module_redis):
    r = module_redis.client()
    r.flushdb()
    with limited.client(ALICE) as alice, limited.client(BOB) as bob:
        assert [alice.post("/v1/jobs", json=OK).status_code for _ in range(3)] == [202] * 3
        assert bob.post("/v1/jobs", json=OK).status_code == 202
        assert r.llen(QUEUE) == 4
        full = bob.post("/v1/jobs", json=OK)
        assert full.status_code == 503, full.text
        assert full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        assert r.llen(QUEUE) == 4 and len(r.keys("latentd:job:*")) == 4
        sync = bob.post("/v1/images/generations", json=OK)
        assert sync.status_code == 503 and "retry-after" in sync.headers


def test_sync_endpoint_504_names_the_job_to_poll(limited, module_redis):
    module_redis.client().flushdb()
    with limited.client(ALICE) as alice:
        resp = alice.post("/v1/images/generations", json=OK)
        assert resp.status_code == 504
        assert resp.headers["x-should-retry"] == "false"
        err = resp.json()["error"]
        job = alice.get(f"/v1/jobs/{err['job_id']}")
        assert job.status_code == 200 and job.json()["status"] == "queued"
        assert err["links"]["self"].endswith(err["job_id"])


def test_metrics_behind_a_token(limited):
    assert httpx.get(limited.url + "/metrics").status_code == 401
    assert httpx.get(limited.url + "/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = httpx.get(limited.url + "/metrics", headers={"Authorization": "Bearer metrics-token"})
    assert ok.status_code == 200
    assert 'latentd_jobs_rejected_total{reason="rate_limited"}' in ok.text
    assert 'latentd_jobs_rejected_total{reason="queue_full"}' in ok.text


def test_cors_allows_only_configured_origins(limited, api):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    good = httpx.options(limited.url + "/v1/jobs", headers={"Origin": "https://app.example", **pre})
    assert good.headers.get("access-control-allow-origin") == "https://app.example"
    evil = httpx.options(limited.url + "/v1/jobs", headers={"Origin": "https://evil.example", **pre})
    assert "access-control-allow-origin" not in evil.headers
    none = httpx.options(api.url + "/v1/jobs", headers={"Origin": "https://app.example", **pre})
    assert "access-control-allow-origin" not in none.headers


def test_metrics_names_and_labels(api):
    with api.client(ALICE) as c:
        jid = c.post("/v1/jobs", json={**OK, "prompt": "secret-prompt-words"}).json()["id"]
        c.get(f"/v1/jobs/{jid}")
        c.post("/v1/jobs", json={**OK, "steps": 0})
        text = c.get("/metrics").text
    for name in ("latentd_api_requests_total", "latentd_api_request_duration_seconds_bucket",
                 "latentd_jobs_admitted_total", "latentd_jobs_rejected_total", "latentd_queue_depth",
                 "latentd_ready_workers"):
        assert name in text, name
    assert 'route="/v1/jobs/{job_id}"' in text and jid not in text
    assert 'latentd_jobs_rejected_total{reason="invalid"}' in text
    assert "secret-prompt-words" not in text and ALICE not in text and "alice" not in text


def test_readyz_503_without_a_worker(api):
    resp = httpx.get(api.url + "/readyz")
    assert resp.status_code == 503 and resp.json()["workers"] == 0 and "retry-after" in resp.headers
    assert httpx.get(api.url + "/healthz").status_code == 200


def test_redis_down_gives_503s_with_retry_after(cfg_model):
    proc = ApiProc(f"redis://127.0.0.1:{free_port()}/0", api_keys=KEYS, model=cfg_model).start()
    try:
        with proc.client(ALICE) as c:
            for method, path in (("POST", "/v1/jobs"), ("GET", "/readyz"), ("GET", "/v1/jobs/" + "a" * 32)):
                resp = c.request(method, path, json=OK if method == "POST" else None)
                assert resp.status_code == 503 and "retry-after" in resp.headers, (path, resp.text)
            assert c.get("/healthz").status_code == 200
        assert ALICE not in proc.output()
    finally:
        proc.stop()
