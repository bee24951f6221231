"""Redis outage as the API sees it: a real uvicorn on a real redis-server (deploy/redis.conf,
AOF), Redis SIGKILLed (and, separately, frozen with SIGSTOP) while the API runs.

While Redis is gone every route that needs it answers 503 with Retry-After, never a 500 and never
a hang (bounded socket timeouts), /readyz is 503, /healthz stays 200, /metrics reports
latentd_redis_up 0, and a sync request waiting at the moment of the crash gets a 503 too. After a
restart on the same data, the API recovers by itself (no restart of the API) and a job admitted
before the crash is still there.

Worker reconnection and job completion across a Redis restart are tests/test_recovery.py's
(test_redis_sigkill_and_restart); not repeated here.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from devkit.api_proc import ALICE, KEYS, ApiProc

OK = {"prompt": "a yellow star", "size": "64x64", "steps": 2}
SANITY_S = 30           # generous bound: "answers, does not hang"; printed latencies are the data


@pytest.fixture
def outage_api(redis_server, tiny_model):
    proc = ApiProc(redis_server.url, api_keys=KEYS, model=tiny_model, rate_limit_per_s=0,
                   sync_wait_s=60).start()
    try:
        yield proc
    finally:
        proc.stop()


def _routes(jid: str):
    return [("POST", "/v1/jobs", OK), ("POST", "/v1/images/generations", OK),
            ("GET", f"/v1/jobs/{jid}", None), ("DELETE", f"/v1/jobs/{jid}", None),
            ("GET", f"/v1/jobs/{jid}/images/0", None)]


def _hit_all(c: httpx.Client, jid: str) -> list[tuple[str, int, float, httpx.Response]]:
    out = []
    for method, path, body in _routes(jid):
        t = time.perf_counter()
        resp = c.request(method, path, json=body)
        out.append((f"{method} {path.replace(jid, '{id}')}", resp.status_code, time.perf_counter() - t, resp))
    return out


def _assert_unavailable(results, what):
    for name, status, dt, resp in results:
        print(f"  {what}: {name} -> {status} in {dt * 1e3:.0f} ms")
        assert status == 503, (what, name, status, resp.text[:300])
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.json()["error"]["code"] == "unavailable"
        assert "Traceback" not in resp.text and ALICE not in resp.text
        assert dt < SANITY_S


def test_redis_sigkill_503s_then_recovers_by_itself(outage_api, redis_server):
    with outage_api.client(ALICE, timeout=SANITY_S + 30) as c:
        created = c.post("/v1/jobs", json=OK)
        assert created.status_code == 202
        jid = created.json()["id"]
        time.sleep(1.5)                  # admitted > 1 s before the crash (appendfsync everysec)

        # a sync request waiting for its job when Redis dies
        waiting: dict = {}

        def sync_call():
            with outage_api.client(ALICE, timeout=SANITY_S + 30) as c2:
                t = time.perf_counter()
                try:
                    waiting["resp"] = c2.post("/v1/images/generations", json=OK)
                finally:
                    waiting["dt"] = time.perf_counter() - t

        th = threading.Thread(target=sync_call)
        th.start()
        time.sleep(1.0)
        redis_server.kill()
        killed = time.perf_counter()

        _assert_unavailable(_hit_all(c, jid), "redis killed")
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is False
        assert c.get("/healthz").status_code == 200
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and "latentd_redis_up 0.0" in metrics.text
        assert c.get("/v1/models").status_code in (200, 503)   # the API reads the model's info itself

        th.join(SANITY_S + 30)
        assert not th.is_alive(), "the sync request hung after Redis died"
        print(f"  in-flight sync request -> {waiting['resp'].status_code} "
              f"{time.perf_counter() - killed:.2f}s after the kill")
        assert waiting["resp"].status_code == 503, waiting["resp"].text

        redis_server.start()             # same port and data: the AOF is replayed
        # the API recovers by itself (no restart of the API)
        t = time.perf_counter()
        assert _recovered(c, jid)
        print(f"  recovered {time.perf_counter() - t:.2f}s after Redis answered PING again")
        again = c.get(f"/v1/jobs/{jid}")
        assert again.status_code == 200, again.text
        assert again.json()["status"] == "queued"               # admitted before the crash: kept
        after = c.post("/v1/jobs", json=OK)
        assert after.status_code == 202, after.text
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is True   # no worker in this test
        assert "latentd_redis_up 1.0" in c.get("/metrics").text
        assert c.delete(f"/v1/jobs/{after.json()['id']}").json()["status"] == "canceled"
    assert ALICE not in outage_api.output()


def test_redis_frozen_answers_503_within_the_socket_timeout(outage_api, redis_server):
    """SIGSTOP: connections open but nothing answers. Without socket timeouts every request would
    hang forever; and since handlers call Redis on the event loop, without a breaker N waiting
    requests would stall the whole API (/healthz included) for N socket timeouts in turn."""
    with outage_api.client(ALICE, timeout=SANITY_S + 30) as c:
        jid = c.post("/v1/jobs", json=OK).json()["id"]
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            results: list = []

            def one(method, path, body):
                with outage_api.client(ALICE, timeout=SANITY_S + 30) as c2:
                    t = time.perf_counter()
                    r = c2.request(method, path, json=body)
                    results.append((f"{method} {path.replace(jid, '{id}')}", r.status_code,
                                    time.perf_counter() - t, r))

            calls = [("POST", "/v1/jobs", OK), ("GET", "/readyz", None)] + \
                [("GET", f"/v1/jobs/{jid}", None)] * 20
            threads = [threading.Thread(target=one, args=a) for a in calls]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            time.sleep(0.3)
            health = c.get("/healthz")
            health_s = time.perf_counter() - t0
            for t in threads:
                t.join(SANITY_S + 30)
            assert not any(t.is_alive() for t in threads), "a request hung on a frozen Redis"
            slowest = max(results, key=lambda x: x[2])
            print(f"  frozen redis: {len(results)} requests answered within {time.perf_counter() - t0:.1f}s "
                  f"(slowest {slowest[0]} {slowest[2]:.2f}s); /healthz {health.status_code} after {health_s:.2f}s")
            for name, status, dt, resp in results:
                assert status == 503, (name, status, resp.text[:300])
                assert "retry-after" in resp.headers
                assert dt < SANITY_S, (name, dt)
            assert health.status_code == 200 and health_s < SANITY_S
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        # thawed: back to normal by itself, without restarting anything
        assert _recovered(c, jid)
        assert c.post("/v1/jobs", json=OK).status_code == 202


def _recovered(c: httpx.Client, jid: str, within_s: float = SANITY_S) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if c.get(f"/v1/jobs/{jid}").status_code == 200:
            return True
        time.sleep(0.1)
    return False
