"""Idempotency-Key on POST /v1/jobs, /v1/images/generations and /v1/images/edits, against a real
redis-server, a real uvicorn and a real worker on the tiny model.

The same key and request, sent 10 times concurrently, 10 times in a row and again after an API
restart, makes exactly one job: one job record, its images once, one job's compute-seconds.
Equivalent spellings of the request match; the same key with another request is a 422 naming
the header; a malformed key is a 400; another API key with the same Idempotency-Key gets its own
job. Nothing half-made: every job record is the one its key names.
"""
from __future__ import annotations

import io
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from devkit.api_proc import ALICE, BOB, KEYS, ApiProc, wait_job
from devkit.services import FAST, RedisServer, WorkerProc
from latentd.jobs import keys

H = "Idempotency-Key"


@pytest.fixture(scope="module")
def idem_stack(tiny_model):
    redis = RedisServer().start()
    api = worker = None
    try:
        api = ApiProc(redis.url, api_keys=KEYS, model=str(tiny_model), rate_limit_per_s=0,
                      sync_wait_s=120).start()
        worker = WorkerProc(redis.url, str(tiny_model), **FAST).start().wait_ready(180)
        yield {"redis": redis, "api": api, "worker": worker, "model": str(tiny_model)}
    finally:
        if worker:
            worker.stop()
        if api:
            api.stop()
        redis.stop()


def jobs_for(redis, marker: str) -> list[dict]:
    """Job records whose prompt carries `marker` (each test uses its own)."""
    r = redis.client()
    out = []
    for k in r.scan_iter(match="latentd:job:*", count=1000):
        rec = {a.decode(): b.decode() for a, b in r.hgetall(k).items()}
        if marker in json.loads(rec.get("spec") or "{}").get("prompt", ""):
            out.append(rec)
    return out


def work_of(recs: list[dict]) -> tuple[int, int, float]:
    """(jobs, images recorded, compute-seconds)."""
    return len(recs), sum(int(r.get("done", 0)) for r in recs), sum(float(r.get("compute_s", 0)) for r in recs)


def fire(url: str, key: str, method: str, path: str, times: int, concurrent: bool, **kw):
    def one(_):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=150) as c:
            return c.request(method, path, **kw)

    if not concurrent:
        return [one(i) for i in range(times)]
    with ThreadPoolExecutor(times) as pool:
        return list(pool.map(one, range(times)))


def test_jobs_route_one_job_for_many_retries_and_an_api_restart(idem_stack):
    api, redis = idem_stack["api"], idem_stack["redis"]
    marker = uuid.uuid4().hex[:8]
    body = {"prompt": f"a red circle {marker}", "size": "64x64", "steps": 2, "n": 2}
    hdr = {H: f"order-{marker}"}
    concurrent = fire(api.url, ALICE, "POST", "/v1/jobs", 10, True, json=body, headers=hdr)
    codes = sorted(r.status_code for r in concurrent)
    assert codes == [200] * 9 + [202], [(r.status_code, r.text[:200]) for r in concurrent]
    ids = {r.json()["id"] for r in concurrent}
    assert len(ids) == 1
    job_id = ids.pop()
    replays = [r for r in concurrent if r.status_code == 200]
    assert all(r.headers["Idempotent-Replayed"] == "true" for r in replays)
    assert all("Idempotent-Replayed" not in r.headers for r in concurrent if r.status_code == 202)

    # an equivalent spelling of the same request: keys reordered, a default written out
    same = {"n": 2, "steps": 2, "prompt": f"a red circle {marker}", "size": "64x64",
            "output_format": "png"}
    sequential = fire(api.url, ALICE, "POST", "/v1/jobs", 10, False, json=same, headers=hdr)
    assert {(r.status_code, r.json()["id"]) for r in sequential} == {(200, job_id)}
    with api.client(ALICE) as c:
        done = wait_job(c, job_id)
    assert done["status"] == "succeeded"

    # the same key after an API restart: still that job (the record is in Redis, not the process)
    api.stop()
    idem_stack["api"] = api = ApiProc(redis.url, api_keys=KEYS, model=idem_stack["model"],
                                      rate_limit_per_s=0, sync_wait_s=120).start()
    with api.client(ALICE) as c:
        again = c.post("/v1/jobs", json=body, headers=hdr)
        assert again.status_code == 200 and again.json()["id"] == job_id
        assert again.json()["status"] == "succeeded"
        # the same key with another request: 422 naming the header, no job
        other = c.post("/v1/jobs", json={**body, "steps": 3}, headers=hdr)
        assert other.status_code == 422, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        assert other.json()["error"]["field"] == H
        # a seed sent explicitly is part of the request
        seeded = c.post("/v1/jobs", json={**body, "seed": 7}, headers=hdr)
        assert seeded.status_code == 422
    jobs, images, compute = work_of(jobs_for(redis, marker))
    print(f"\n/v1/jobs: 21 requests + 2 refused -> jobs={jobs} images={images} compute_s={compute:.3f} "
          f"(one job: images=2, compute_s={float(done['usage'].get('compute_s', compute)):.3f})")
    assert (jobs, images) == (1, 2)


def test_another_api_key_gets_its_own_job(idem_stack):
    api, redis = idem_stack["api"], idem_stack["redis"]
    marker = uuid.uuid4().hex[:8]
    body = {"prompt": f"a blue square {marker}", "size": "64x64", "steps": 2}
    hdr = {H: "shared-key"}
    with api.client(ALICE) as a, api.client(BOB) as b:
        ra, rb = a.post("/v1/jobs", json=body, headers=hdr), b.post("/v1/jobs", json=body, headers=hdr)
        assert ra.status_code == rb.status_code == 202
        assert ra.json()["id"] != rb.json()["id"]
        assert b.post("/v1/jobs", json=body, headers=hdr).json()["id"] == rb.json()["id"]
        wait_job(a, ra.json()["id"]), wait_job(b, rb.json()["id"])
    assert len(jobs_for(redis, marker)) == 2


@pytest.mark.parametrize("value,why", [("k" * 256, "longer than 255"), ("a\tb", "control"),
                                       ("", "empty"),
                                       ("caf\u00e9", "non-ASCII")])
def test_malformed_keys_are_400_naming_the_header(idem_stack, value, why):
    api, redis = idem_stack["api"], idem_stack["redis"]
    before = redis.client().llen(keys.rq_queue("latentd"))
    for path in ("/v1/jobs", "/v1/images/generations"):
        with api.client(ALICE) as c:
            resp = c.post(path, json={"prompt": "x", "size": "64x64", "steps": 2},
                          headers=[(H.encode(), value.encode("latin-1"))])
        assert resp.status_code == 400, (path, resp.text)
        err = resp.json()["error"]
        assert err["field"] == H and err["code"] == "invalid_header" and why in err["message"]
    assert redis.client().llen(keys.rq_queue("latentd")) == before
    with api.client(ALICE) as c:          # 255 characters is fine
        assert c.post("/v1/jobs", json={"prompt": "x", "size": "64x64", "steps": 2},
                      headers={H: "k" * 255}).status_code in (200, 202)   # 200: an earlier case's


def test_sync_generations_concurrent_retries_get_one_result(idem_stack):
    api, redis = idem_stack["api"], idem_stack["redis"]
    marker = uuid.uuid4().hex[:8]
    body = {"prompt": f"a green tree {marker}", "size": "64x64", "steps": 2,
            "response_format": "b64_json"}
    hdr = {H: f"sync-{marker}"}
    out = fire(api.url, ALICE, "POST", "/v1/images/generations", 10, True, json=body, headers=hdr)
    assert all(r.status_code == 200 for r in out), [(r.status_code, r.text[:200]) for r in out]
    assert len({r.json()["data"][0]["b64_json"] for r in out}) == 1        # the same image
    assert len({r.json()["data"][0]["seed"] for r in out}) == 1            # one drawn seed
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in out) == 9
    later = fire(api.url, ALICE, "POST", "/v1/images/generations", 3, False, json=body, headers=hdr)
    assert all(r.json()["data"][0]["b64_json"] == out[0].json()["data"][0]["b64_json"] for r in later)
    jobs, images, compute = work_of(jobs_for(redis, marker))
    print(f"\ngenerations: 13 requests -> jobs={jobs} images={images} compute_s={compute:.3f}")
    assert (jobs, images) == (1, 1)


def test_sync_edits_retry_is_the_same_job(idem_stack):
    from PIL import Image

    api, redis = idem_stack["api"], idem_stack["redis"]
    marker = uuid.uuid4().hex[:8]
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    form = {"prompt": f"a red wall {marker}", "steps": "2", "strength": "0.5"}
    hdr = {H: f"edit-{marker}"}
    out = []
    with api.client(ALICE, timeout=150) as c:
        for _ in range(3):
            out.append(c.post("/v1/images/edits", data=form, files={"image": ("a.png", buf.getvalue())},
                              headers=hdr))
        other = c.post("/v1/images/edits", data={**form, "strength": "0.6"},
                       files={"image": ("a.png", buf.getvalue())}, headers=hdr)
    assert [r.status_code for r in out] == [200, 200, 200], [r.text[:200] for r in out]
    assert other.status_code == 422 and other.json()["error"]["field"] == H
    assert len(jobs_for(redis, marker)) == 1


def test_openapi_documents_the_header(idem_stack):
    spec = httpx.get(idem_stack["api"].url + "/openapi.json").json()
    for path in ("/v1/jobs", "/v1/images/generations", "/v1/images/edits"):
        params = spec["paths"][path]["post"].get("parameters", [])
        assert any(p["name"] == H and p["in"] == "header" for p in params), path
