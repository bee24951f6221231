"""End to end: real redis-server, real uvicorn API, real `latentd worker` on the tiny model.
Submit -> poll -> PNG of the requested size; the sync endpoint through the official `openai`
client in both response formats; signed URLs on real images; /readyz before and after a worker."""
import base64
import time

import httpx
import pytest

from devkit.api_proc import ALICE, BOB, KEYS, ApiProc, open_png, wait_job
from devkit.services import RedisServer, WorkerProc

FAST = {"steps": 2, "sampler": "euler"}


@pytest.fixture(scope="module")
def stack(tiny_model):
    redis_srv = RedisServer().start()      # its own: no other worker has ever heartbeated here
    api = worker = None
    try:
        api = ApiProc(redis_srv.url, api_keys=KEYS, model=tiny_model, rate_limit_per_s=0).start()
        before = httpx.get(api.url + "/readyz").status_code
        worker = WorkerProc(redis_srv.url, tiny_model).start().wait_ready(180)
        yield {"api": api, "worker": worker, "readyz_before": before}
    finally:
        if worker:
            worker.stop()
        if api:
            api.stop()
        redis_srv.stop()


def test_readyz_503_before_a_worker_and_200_after(stack):
    assert stack["readyz_before"] == 503
    resp = httpx.get(stack["api"].url + "/readyz")
    assert resp.status_code == 200 and resp.json()["workers"] >= 1


def test_submit_poll_png_of_the_requested_size(stack):
    api = stack["api"]
    with api.client(ALICE) as alice, api.client(BOB) as bob:
        created = alice.post("/v1/jobs", json={"prompt": "a cat", "size": "64x128", "n": 2,
                                               "seed": 41, **FAST})
        assert created.status_code == 202, created.text
        job = wait_job(alice, created.json()["id"], timeout=60)
        assert job["status"] == "succeeded", job
        assert [im["seed"] for im in job["images"]] == [41, 42]
        assert job["progress"] == {"step": 4, "total": 4, "parked": False}
        assert job["timings"]["finished_at"] >= job["timings"]["started_at"] >= job["timings"]["created_at"]
        jid = job["id"]
        for k, im in enumerate(job["images"]):
            via_key = alice.get(f"/v1/jobs/{jid}/images/{k}")
            assert via_key.headers["content-type"] == "image/png"
            assert open_png(via_key.content).size == (64, 128)
            signed = httpx.get(im["url"])                       # absolute, no headers
            assert signed.status_code == 200 and signed.content == via_key.content
            assert bob.get(f"/v1/jobs/{jid}/images/{k}").status_code == 404
        # a signature moved to the other image, or to another job, is refused
        sig0 = job["images"][0]["url"]
        assert httpx.get(sig0.replace("/images/0?", "/images/1?")).status_code == 403
        other = wait_job(alice, alice.post("/v1/jobs", json={"prompt": "dog", "size": "64x64", **FAST}).json()["id"], timeout=60)
        assert httpx.get(sig0.replace(jid, other["id"])).status_code == 403
        assert alice.get(f"/v1/jobs/{jid}/images/2").status_code == 404
        assert bob.get(f"/v1/jobs/{jid}").status_code == 404


def test_openai_client_both_response_formats(stack):
    from openai import OpenAI

    client = OpenAI(base_url=stack["api"].url + "/v1", api_key=ALICE, max_retries=0, timeout=60)
    res = client.images.generate(prompt="a red square", size="64x64", n=2, response_format="b64_json",
                                 extra_body={"seed": 7, **FAST})
    assert len(res.data) == 2 and res.created > 0
    for k, item in enumerate(res.data):
        assert open_png(base64.b64decode(item.b64_json)).size == (64, 64)
        assert item.revised_prompt == "a red square"
        assert (item.model_extra or {}).get("seed") == 7 + k
        assert (item.model_extra or {}).get("nsfw") in (True, False)
    same = client.images.generate(prompt="a red square", size="64x64", n=1, response_format="b64_json",
                                  extra_body={"seed": 7, **FAST})
    import numpy as np

    a, b = (np.asarray(open_png(base64.b64decode(d.b64_json)), dtype=np.int16) for d in (same.data[0], res.data[0]))
    assert np.array_equal(a, b)              # same seed, same image, alone or in a batch of 2
    res = client.images.generate(prompt="a blue circle", size="64x64", response_format="url",
                                 extra_body=FAST)
    url = res.data[0].url
    assert url.startswith(stack["api"].url + "/v1/jobs/") and "sig=" in url
    assert open_png(httpx.get(url).content).size == (64, 64)
    assert isinstance((res.data[0].model_extra or {}).get("seed"), int)   # random seed returned
    with pytest.raises(Exception) as bad:
        client.images.generate(prompt="x", size="1000x1000")
    assert getattr(bad.value, "status_code", None) == 422


def test_cancel_ends_the_job_canceled(stack):
    api = stack["api"]
    with api.client(ALICE) as alice:
        jid = alice.post("/v1/jobs", json={"prompt": "slow", "size": "64x64", "n": 4, "steps": 150}).json()["id"]
        canceled = alice.delete(f"/v1/jobs/{jid}")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        time.sleep(0.5)
        job = alice.get(f"/v1/jobs/{jid}").json()
        assert job["status"] == "canceled" and job["error"]["code"] == "canceled"
        # the worker goes on with the next job
        nxt = wait_job(alice, alice.post("/v1/jobs", json={"prompt": "next", "size": "64x64", **FAST}).json()["id"], timeout=60)
        assert nxt["status"] == "succeeded"
