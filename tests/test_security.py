"""Security, against a real stack (redis-server, uvicorn, `latentd worker` on the tiny
model). What tests/test_api_auth.py, test_api_admission.py and test_api_e2e.py already show (401
table, 404 on a queued job, signed-URL tampering/expiry/moving, metrics token, basic CORS
preflight) is not repeated; this adds:

- tenancy on *finished* jobs with real images: another key gets 404 on every id route (status,
  every image index, cancel, and an owner's signed URL presented together with its own key), and
  its cancel changes nothing;
- keys never appear in the API's or the worker's output (debug logging + access log), in /metrics
  (API and worker), in PNG metadata, in any response body, or anywhere in Redis (only hashes);
- /metrics on a separate port (`latentd serve` with LATENTD_METRICS_PORT): absent from the API port;
- CORS on actual (non-preflight) responses: only the configured origin is echoed, never `*`;
- flagged images (a model whose safety checker flags everything) are stored and served black with
  nsfw=true, and the policy is the deployment's: LATENTD_SAFETY=false serves the real image.
"""
from __future__ import annotations

import re

import base64
import io
import shutil
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from devkit.api_proc import ALICE, BOB, KEYS, ApiProc, open_png, wait_job
from devkit.services import RedisServer, WorkerProc, free_port

FAST = {"size": "64x64", "steps": 2, "sampler": "euler"}
ORIGIN = "https://app.example"


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(open_png(png).convert("RGB"))


def flag_everything(src, dst):
    """A copy of the tiny model whose safety checker flags every image: concept thresholds of -2
    (cosine similarity - (-2) > 0 always)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    folder = dst / "safety_checker"
    for f in folder.glob("*.safetensors"):
        state = load_file(str(f))
        if "concept_embeds_weights" in state:
            state["concept_embeds_weights"] = state["concept_embeds_weights"] * 0 - 2.0
            save_file(state, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def module_redis():
    """This module's own redis-server: its workers and jobs must not leak into other modules'."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sec(module_redis, tiny_model, tmp_path_factory):
    """API at debug log level with the access log and CORS for ORIGIN; a worker on a model that
    flags everything, with its metrics port on."""
    port = free_port()
    api = ApiProc(module_redis.url, port=port, api_keys=KEYS, model=tiny_model, rate_limit_per_s=0,
                  cors_origins=ORIGIN,
                  argv=[sys.executable, "-m", "uvicorn", "--factory", "latentd.app.main:app_from_env",
                        "--host", "127.0.0.1", "--port", str(port), "--log-level", "debug"]).start()
    flagged = flag_everything(tiny_model, tmp_path_factory.mktemp("flagged") / "model")
    worker = None
    try:
        wport = free_port()
        worker = WorkerProc(module_redis.url, str(flagged), worker_metrics_port=wport,
                            log_level="debug").start().wait_ready(180)
        yield {"api": api, "worker": worker, "worker_metrics": f"http://127.0.0.1:{wport}/metrics",
               "model": flagged}
    finally:
        if worker:
            worker.stop()
        api.stop()


def test_another_key_gets_404_on_every_route_of_a_finished_job(sec):
    api = sec["api"]
    with api.client(ALICE) as alice, api.client(BOB) as bob:
        job = wait_job(alice, alice.post("/v1/jobs", json={"prompt": "mine", "n": 2, **FAST}).json()["id"])
        assert job["status"] == "succeeded", job
        jid = job["id"]
        probes = [("GET", f"/v1/jobs/{jid}"), ("DELETE", f"/v1/jobs/{jid}")]
        probes += [("GET", f"/v1/jobs/{jid}/images/{k}") for k in range(3)]
        for method, path in probes:
            resp = bob.request(method, path)
            assert resp.status_code == 404, (method, path, resp.text)
            assert jid not in resp.text or resp.json()["error"]["field"] in ("job_id", "k")
        # bob's own key next to alice's valid signature: the key decides, and it is not alice's
        signed = job["images"][0]["url"]
        assert bob.get(signed).status_code == 404
        assert httpx.get(signed).status_code == 200             # the signature alone works
        # bob's cancel changed nothing; alice still sees her images
        again = alice.get(f"/v1/jobs/{jid}").json()
        assert again["status"] == "succeeded" and again["error"] is None
        assert alice.get(f"/v1/jobs/{jid}/images/1").status_code == 200
        # unknown and foreign ids answer the same body (no existence oracle)
        assert bob.get(f"/v1/jobs/{jid}").json() == bob.get("/v1/jobs/" + "e" * 32).json()


def test_flagged_images_are_stored_and_served_black(sec, module_redis):
    api = sec["api"]
    with api.client(ALICE) as alice:
        job = wait_job(alice, alice.post("/v1/jobs", json={"prompt": "anything", "n": 2, **FAST}).json()["id"])
        assert job["status"] == "succeeded", job
        assert [im["nsfw"] for im in job["images"]] == [True, True]
        jid = job["id"]
        r = module_redis.client()
        for k, im in enumerate(job["images"]):
            stored = r.get(f"latentd:img:{jid}:{k}")           # what is kept is already black
            assert stored is not None and _pixels(stored).max() == 0
            assert _pixels(alice.get(f"/v1/jobs/{jid}/images/{k}").content).max() == 0
            assert _pixels(httpx.get(im["url"]).content).max() == 0
        sync = alice.post("/v1/images/generations",
                          json={"prompt": "anything", "response_format": "b64_json", **FAST}).json()
        assert sync["data"][0]["nsfw"] is True
        assert _pixels(base64.b64decode(sync["data"][0]["b64_json"])).max() == 0
    text = httpx.get(sec["worker_metrics"]).text
    flagged = [ln for ln in text.splitlines() if re.match(r"latentd_worker_images_flagged_total(\{[^}]*\})? ", ln)]
    assert flagged and float(flagged[0].split()[1]) >= 3


def test_keys_never_leak(sec, module_redis):
    """Runs after the jobs above (same module): every place a key could end up is searched."""
    api = sec["api"]
    bodies = []
    with api.client(ALICE) as alice:
        bodies.append(alice.post("/v1/jobs", json={"prompt": "x", "steps": 0}).text)        # 422
        bodies.append(alice.get("/v1/jobs/" + "0" * 32).text)                                # 404
        bodies.append(alice.get("/v1/jobs/" + "0" * 32 + "/images/0?o=alice&exp=1&sig=x").text)
        bodies.append(alice.get("/v1/models").text)
        bodies.append(alice.get("/metrics").text)
        jobs = alice.get(f"/v1/jobs/{alice.post('/v1/jobs', json={'prompt': 'x', **FAST}).json()['id']}")
        bodies.append(jobs.text)
    for near in (ALICE + "x", ALICE[:-1], ALICE.upper(), BOB + "0"):
        with api.client(near) as c:
            resp = c.get("/v1/models")
            assert resp.status_code == 401
            bodies.append(resp.text)
            assert near.strip() not in resp.text and near.strip() not in str(resp.headers)
    bodies.append(httpx.get(sec["worker_metrics"]).text)
    time.sleep(0.5)
    logs = api.output() + sec["worker"].output()
    assert "GET /v1/models" in api.output() or "/v1/" in api.output()   # the access log is on
    for key in (ALICE, BOB):
        for what, text in [("API/worker output", logs)] + [(f"body {i}", b) for i, b in enumerate(bodies)]:
            assert key not in text and key[4:] not in text, what
    # Redis holds no key anywhere (only their hashes live in the API's settings)
    r = module_redis.client()
    secrets = [k.encode() for k in (ALICE, BOB)]
    for name in r.scan_iter(count=1000):
        kind = r.type(name)
        if kind == b"string":
            values = [r.get(name)]
        elif kind == b"hash":
            values = list(r.hgetall(name).items())
            values = [b for kv in values for b in kv]
        elif kind == b"list":
            values = r.lrange(name, 0, -1)
        elif kind == b"zset":
            values = [m for m, _ in r.zrange(name, 0, -1, withscores=True)]
        elif kind == b"set":
            values = list(r.smembers(name))
        else:
            values = []
        for v in [name] + [x for x in values if x]:
            assert not any(s in v for s in secrets), name
    # PNG metadata: no key and no owner name
    jid = jobs.json()["id"]
    with api.client(ALICE) as alice:
        done = wait_job(alice, jid)
        if done["status"] == "succeeded":
            im = Image.open(io.BytesIO(alice.get(f"/v1/jobs/{jid}/images/0").content))
            meta = " ".join(str(v) for v in im.info.values())
            assert ALICE not in meta and "alice" not in meta


def test_cors_echoes_only_the_configured_origin(sec):
    url = sec["api"].url
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}) as c:
        good = c.get("/v1/models", headers={"Origin": ORIGIN})
        assert good.headers.get("access-control-allow-origin") == ORIGIN
        assert good.headers.get("access-control-allow-credentials") != "true"
        for origin in ("https://evil.example", ORIGIN + ".evil.example", "null", ORIGIN.upper()):
            bad = c.get("/v1/models", headers={"Origin": origin})
            assert bad.headers.get("access-control-allow-origin") in (None, ORIGIN), origin
            assert bad.headers.get("access-control-allow-origin") != "*"
            pre = httpx.options(url + "/v1/jobs", headers={"Origin": origin,
                                                           "Access-Control-Request-Method": "DELETE"})
            assert pre.headers.get("access-control-allow-origin") is None, origin


def test_metrics_on_a_separate_port(module_redis, tiny_model):
    port, mport = free_port(), free_port()
    proc = ApiProc(module_redis.url, port=port, api_keys=KEYS, model=tiny_model, metrics_port=mport,
                   argv=[sys.executable, "-m", "latentd.cli", "serve", "--port", str(port)]).start()
    try:
        assert httpx.get(proc.url + "/metrics", headers={"Authorization": f"Bearer {ALICE}"}).status_code == 404
        with proc.client(ALICE) as c:
            assert c.post("/v1/jobs", json={"prompt": "x", **FAST}).status_code == 202
        text = httpx.get(f"http://127.0.0.1:{mport}/metrics").text
        assert "latentd_queue_depth" in text and "latentd_redis_up 1.0" in text
        assert ALICE not in text and ALICE not in proc.output()
    finally:
        proc.stop()


def test_safety_policy_is_a_deployment_setting(sec, module_redis):
    """Last in the module: it replaces the worker. Same model, a worker deployed with LATENTD_SAFETY=false: nothing is flagged or blacked."""
    sec["worker"].stop()
    off = WorkerProc(module_redis.url, str(sec["model"]), safety="false").start().wait_ready(180)
    try:
        with sec["api"].client(ALICE) as alice:
            job = wait_job(alice, alice.post("/v1/jobs", json={"prompt": "anything", **FAST}).json()["id"])
            assert job["status"] == "succeeded", (job, off.output())
            assert job["images"][0]["nsfw"] is False
            assert _pixels(alice.get(f"/v1/jobs/{job['id']}/images/0").content).max() > 0
    finally:
        off.stop()
