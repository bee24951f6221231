"""POST /v1/jobs is served by app/fastpath.py without FastAPI's router: the same answers, error
bodies, headers and metrics as through the router (in-process app, real redis-server)."""
from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from devkit.api_proc import ALICE, KEYS, SECRET
from latentd.jobs import keys

OK = {"prompt": "a red circle", "size": "64x64"}


@pytest.fixture
def client(redis_server, cfg_model):
    from latentd.app import metrics
    from latentd.app.main import create_app
    from latentd.config.settings import Settings

    s = Settings(redis_url=redis_server.url, api_keys=KEYS, model=cfg_model, signing_secret=SECRET,
                 keys_file="/nonexistent/latentd-keys.json", rate_limit_per_s=0.001, rate_limit_burst=2,
                 cors_origins="https://app.example")
    metrics._COUNTS.clear()
    with TestClient(create_app(s), base_url="http://api.example") as c:
        yield c


def _count(route: str, status: str) -> float:
    from latentd.app.metrics import REQUESTS

    return REQUESTS.labels(route, "POST", status)._value.get()


def test_jobs_post_answers_as_the_route_does(client, redis_server):
    before = _count("/v1/jobs", "202")
    r = client.post("/v1/jobs", json=OK, headers={"Authorization": f"Bearer {ALICE}"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and r.headers["location"] == body["links"]["self"]
    assert body["links"]["self"] == f"http://api.example/v1/jobs/{body['id']}"
    assert redis_server.client().lrange(keys.rq_queue("latentd"), 0, -1) == [body["id"].encode()]
    assert _count("/v1/jobs", "202") == before + 1          # labelled by the route template


def test_jobs_post_errors_keep_their_format(client):
    r = client.post("/v1/jobs", json=OK)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    auth = {"Authorization": f"Bearer {ALICE}"}
    r = client.post("/v1/jobs", json={**OK, "steps": 10_000}, headers=auth)
    assert r.status_code == 422 and r.json()["error"]["param"] == "steps"
    r = client.post("/v1/jobs", content=b"{not json", headers={**auth, "Content-Type": "application/json"})
    assert r.status_code in (400, 422) and "error" in r.json()
    # the rate limit, now checked inside the admission script: burst 2, then 429 + Retry-After
    codes = [client.post("/v1/jobs", json=OK, headers=auth).status_code for _ in range(3)]
    assert codes == [202, 202, 429]
    r = client.post("/v1/jobs", json=OK, headers=auth)
    assert r.json()["error"]["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
    assert _count("/v1/jobs", "429") >= 2


def test_cors_and_other_routes_still_wrap_it(client):
    r = client.post("/v1/jobs", json=OK, headers={"Authorization": f"Bearer {ALICE}",
                                                 "Origin": "https://app.example"})
    assert r.status_code == 202 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert client.post("/v1/jobs/", json=OK).status_code in (307, 401, 404, 405)   # not the fast path
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {ALICE}"}).status_code == 200
