"""Deadlines, per-key quotas and usage, end to end: real redis-server, real uvicorn API (keys file
with quotas), a real `latentd worker` on the tiny model running one image at a time (so a queue
forms). No mocks; waits poll with deadlines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from devkit.api_proc import ApiProc, service_stack, wait_job
from devkit.services import ROOT, poll
from latentd.app import auth

LONG = {"prompt": "long", "size": "64x64", "n": 16, "steps": 150}     # seconds at batch 1
QUICK = {"prompt": "quick", "size": "64x64", "steps": 2, "sampler": "euler"}
TERMINAL = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keys") / "keys.json")
    keys = {"alice": auth.add_key(path, "alice"),
            "bob": auth.add_key(path, "bob", quota={"images": 3}),
            "carol": auth.add_key(path, "carol", quota={"concurrent": 1, "compute_s": 3600})}
    settings = dict(keys_file=path, api_keys="", model=tiny_model, rate_limit_per_s=0, env="dev", max_n=16,
                    worker_max_batch=1)
    with service_stack(tiny_model, api_settings=settings, worker_max_batch=1) as st:
        yield {**st, "keys": keys, "settings": settings, "keys_file": path}


def test_bad_deadline_and_bad_quota_settings_name_the_field(stack, tmp_path):
    with stack["api"].client(stack["keys"]["alice"]) as c:
        for bad in (0, 86401, "5", 1.5):
            r = c.post("/v1/jobs", json={**QUICK, "deadline_s": bad})
            assert r.status_code == 422 and r.json()["error"]["field"] == "deadline_s", r.text
        r = c.post("/v1/images/edits", data={"prompt": "x", "deadline_s": "-3"},
                   files={"image": ("i.png", b"not a png", "image/png")})
        assert r.status_code == 422 and r.json()["error"]["field"] in ("deadline_s", "image"), r.text
    # the CLI: a clear error naming the quota, and nothing written
    path = tmp_path / "keys.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LATENTD_KEYS_FILE": str(path)}
    for bad, name in (("images=lots", "images"), ("images=10,speed=3", "speed"), ("concurrent=0", "concurrent")):
        out = subprocess.run([sys.executable, "-m", "latentd.cli", "keys", "create", "dan", "--quota", bad],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and name in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert not path.exists()
    # the keys file: the API refuses to load a bad quota, naming it
    path.write_text(json.dumps({"dan": {"sha256": auth.hash_key("k"), "quota": {"images": -1}}}))
    with pytest.raises(ValueError, match="images"):
        auth.read_quotas(str(path))


def test_no_ready_worker_refuses_a_deadline_at_admission(stack):
    # a second API whose default model's queue has no worker
    api = ApiProc(stack["redis"].url, **{**stack["settings"], "queue_name": "idle"}).start()
    try:
        with api.client(stack["keys"]["alice"]) as c:
            r = c.post("/v1/jobs", json={**QUICK, "deadline_s": 5})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
            err = r.json()["error"]
            assert err["field"] == "deadline_s" and err["allowed"]["ready_workers"] == 0
            assert "estimated_start_s" in err["allowed"]
            c.delete(f"/v1/jobs/{c.post('/v1/jobs', json=QUICK).json()['id']}")   # without: queued
    finally:
        api.stop()


def test_running_job_past_its_deadline_stops_within_a_step_and_is_charged(stack):
    with stack["api"].client(stack["keys"]["alice"]) as c:
        r = c.post("/v1/jobs", json={**LONG, "deadline_s": 1})
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        job = wait_job(c, jid, timeout=60)
        assert job["status"] == "failed" and job["error"]["code"] == "deadline_exceeded", job
        assert 0 < job["progress"]["step"] < job["progress"]["total"]         # it ran, did not finish
        assert job["usage"]["compute_seconds"] > 0 and job["usage"]["steps"] == job["progress"]["step"]


def _running(c, jid):
    d = c.get(f"/v1/jobs/{jid}").json()
    return d["status"] == "running" and d["progress"]["step"] > 0


def test_job_not_started_by_its_deadline_fails_without_a_step(stack):
    with stack["api"].client(stack["keys"]["alice"]) as c:
        blocker = c.post("/v1/jobs", json=LONG).json()["id"]
        poll(lambda: _running(c, blocker), 60, every=0.02, name="blocker running")
        late = c.post("/v1/jobs", json={**QUICK, "deadline_s": 1})
        assert late.status_code == 202, late.text          # nothing ahead of it in the queue
        late_id = late.json()["id"]
        due = time.time() + 1.2        # (admitted just now: its deadline is 1 s after admission)
        poll(lambda: time.time() > due, 60, every=0.02, name="deadline passed")
        c.delete(f"/v1/jobs/{blocker}")
        job = wait_job(c, late_id, timeout=60)
        assert job["status"] == "failed" and job["error"]["code"] == "deadline_exceeded", job
        assert job["progress"]["step"] == 0 and job["images"] == [] and job["usage"]["steps"] == 0


def test_a_deadline_behind_a_long_queue_is_refused_with_the_estimate(stack):
    with stack["api"].client(stack["keys"]["alice"]) as c:
        one = {**LONG, "n": 1}
        assert wait_job(c, c.post("/v1/jobs", json=one).json()["id"])["status"] == "succeeded"  # measured
        admitted, refused = [], None
        for _ in range(60):
            r = c.post("/v1/jobs", json={**one, "deadline_s": 1})
            if r.status_code == 429:
                refused = r
                break
            assert r.status_code == 202, r.text
            admitted.append(r.json()["id"])
        assert refused is not None, "never refused"
        err = refused.json()["error"]
        assert err["code"] == "deadline_unreachable" and err["field"] == "deadline_s"
        assert err["allowed"]["estimated_start_s"] > 1 and err["allowed"]["queue_ahead"] >= 1
        assert int(refused.headers["Retry-After"]) >= 1
        for jid in admitted:     # each either made it or failed its deadline; none is lost
            job = wait_job(c, jid, timeout=120)
            assert job["status"] == "succeeded" or job["error"]["code"] == "deadline_exceeded", job


def _headers(r) -> dict:
    return {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("x-ratelimit-")}


def test_images_quota_429_with_headers_other_key_unaffected_survives_restart(stack):
    api, keys = stack["api"], stack["keys"]
    with api.client(keys["bob"]) as bob, api.client(keys["alice"]) as alice:
        ok = bob.post("/v1/jobs", json={**QUICK, "n": 2})
        assert ok.status_code == 202, ok.text
        h = _headers(ok)
        assert h["x-ratelimit-limit-images"] == "3" and h["x-ratelimit-remaining-images"] == "1"
        assert 0 < int(h["x-ratelimit-reset-images"]) <= 86400
        over = bob.post("/v1/jobs", json={**QUICK, "n": 2})
        assert over.status_code == 429, over.text
        err = over.json()["error"]
        assert err["code"] == "quota_exceeded" and err["field"] == "images"
        assert 0 < int(over.headers["Retry-After"]) <= 86400
        assert _headers(over)["x-ratelimit-remaining-images"] == "1"
        assert wait_job(bob, ok.json()["id"])["status"] == "succeeded"
        # another key: no quota, no headers, admitted
        other = alice.post("/v1/jobs", json={**QUICK, "n": 2})
        assert other.status_code == 202 and not _headers(other)
        wait_job(alice, other.json()["id"])
    api.stop()          # the counters are in Redis: a new API process sees them
    api.start()
    with api.client(keys["bob"]) as bob:
        assert _headers(bob.get("/v1/models"))["x-ratelimit-remaining-images"] == "1"   # every response
        assert bob.post("/v1/jobs", json={**QUICK, "n": 2}).status_code == 429
        # a canceled job gives back the images it did not make
        c1 = bob.post("/v1/jobs", json={**QUICK, "n": 1})
        assert c1.status_code == 202 and _headers(c1)["x-ratelimit-remaining-images"] == "0"
        bob.delete(f"/v1/jobs/{c1.json()['id']}")
        job = wait_job(bob, c1.json()["id"])
        expect = "0" if job["images"] else "1"
        assert _headers(bob.get("/v1/usage"))["x-ratelimit-remaining-images"] == expect


def test_concurrent_quota(stack):
    api, keys = stack["api"], stack["keys"]
    with api.client(keys["carol"]) as carol:
        first = carol.post("/v1/jobs", json=LONG)
        assert first.status_code == 202, first.text
        assert _headers(first)["x-ratelimit-remaining-concurrent"] == "0"
        second = carol.post("/v1/jobs", json=QUICK)
        assert second.status_code == 429 and second.json()["error"]["field"] == "concurrent"
        assert second.headers["Retry-After"] == "2"
        carol.delete(f"/v1/jobs/{first.json()['id']}")
        third = carol.post("/v1/jobs", json=QUICK)        # a slot is free again
        assert third.status_code == 202, third.text
        wait_job(carol, third.json()["id"])
        assert _headers(carol.get("/v1/usage"))["x-ratelimit-remaining-concurrent"] == "1"


def test_usage_equals_the_sum_of_the_jobs_usage(stack):
    api = stack["api"]
    for name in ("alice", "bob", "carol"):
        with api.client(stack["keys"][name]) as c:
            jobs = c.get("/v1/jobs", params={"limit": 50}).json()["data"]
            jobs = [wait_job(c, j["id"]) for j in jobs]
            got = c.get("/v1/usage").json()
            want = {"jobs": len(jobs), "images": sum(j["usage"]["images"] for j in jobs),
                    "steps": sum(j["usage"]["steps"] for j in jobs)}
            total = got["total"]
            assert {k: total[k] for k in want} == want, (name, got)
            assert total["compute_seconds"] == pytest.approx(
                sum(j["usage"]["compute_seconds"] for j in jobs), abs=1e-4)
            # by model (a queue this API does not serve, the second API's, keeps its queue name)
            assert sum(m["jobs"] for m in got["by_model"].values()) == total["jobs"]
            assert len(got["days"]) == 7 and got["days"][-1]["total"] == total
    with api.client(stack["keys"]["alice"]) as c:
        for params, field in (({"start": "2024-02-30"}, "start"), ({"start": "2025-01-02", "end": "2025-01-01"}, "start"),
                              ({"start": "2020-01-01", "end": "2025-01-01"}, "start"), ({"end": "x"}, "end")):
            r = c.get("/v1/usage", params=params)
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
