"""`latentd worker` end to end: real redis-server, real worker subprocesses, the tiny model.

Each test submits through JobClient (what the API uses) and checks what a client would see.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from latentd.config.settings import Settings
from devkit.services import FAST, WorkerProc, free_port, scrape, wait_status
from latentd.jobs import keys
from latentd.jobs.client import JobClient
from latentd.jobs.models import name_of
from latentd.jobs.spec import JobSpec

@pytest.fixture(scope="module")
def shared(tiny_model):
    """One Redis + one worker (metrics on) shared by the tests that need nothing special, since
    starting a worker costs seconds (torch import). Tests only look at their own jobs."""
    from devkit.services import RedisServer

    server = RedisServer().start()
    port = free_port()
    w = WorkerProc(server.url, str(tiny_model), worker_metrics_port=port, **FAST)
    try:
        w.start().wait_ready()
        w.metrics_port = port
        w.redis = server
        w.client = lambda **over: JobClient(server.client(), Settings(redis_url=server.url, **over))
        yield w
    finally:
        w.stop()
        server.stop()


def test_submit_to_png_with_metadata(shared):
    w = shared
    c = shared.client()
    ready = c.ready_workers()
    assert [x["name"] for x in ready] == [w.name]
    assert ready[0]["model"]["native_width"] == 64 and c.models()[0]["name"]
    jid = c.submit(JobSpec(prompt="a red cat", owner="alice", n=2, steps=3, seed=41,
                           width=48, height=32, sampler="euler"))
    d = c.wait(jid, "alice", 60)
    assert d["status"] == "succeeded", (d, w.output())
    assert [(i["index"], i["seed"]) for i in d["images"]] == [(0, 41), (1, 42)]
    assert d["progress"] == {"step": 6, "total": 6, "parked": False}
    assert d["created_at"] <= d["started_at"] <= d["finished_at"]
    assert d["usage"]["compute_seconds"] > 0 and d["error"] is None
    pngs = [c.image_bytes(jid, k, "alice") for k in (0, 1)]
    assert c.image_bytes(jid, 0, "bob") is None and c.image_bytes(jid, 2, "alice") is None
    for k, png in enumerate(pngs):
        im = Image.open(io.BytesIO(png))
        assert im.format == "PNG" and im.size == (48, 32)
        meta = json.loads(im.text["latentd"])
        assert meta["prompt"] == "a red cat" and meta["seed"] == 41 + k and meta["steps"] == 3
        assert "alice" not in im.text["parameters"] + im.text["latentd"]   # never the owner/key
    assert pngs[0] != pngs[1]
    r = shared.redis.client()
    assert r.hget(keys.rq_job(jid), "status") == b"finished"
    assert r.zcard(keys.rq_started("latentd")) == 0 and r.zcard(keys.leases("latentd")) == 0


def test_same_seed_same_png_and_rq_info(shared):
    c = shared.client()
    a, b = (c.submit(JobSpec(prompt="a dog", owner="o", steps=2, seed=7)) for _ in range(2))
    assert c.wait(a, "o", 60)["status"] == c.wait(b, "o", 60)["status"] == "succeeded"
    assert c.image_bytes(a, 0, "o") == c.image_bytes(b, 0, "o")
    out = subprocess.run([sys.executable, "-m", "rq.cli", "info", "--url", shared.redis.url],
                         capture_output=True, text=True, timeout=60)
    assert "latentd" in out.stdout and shared.name in out.stdout, out.stdout + out.stderr


def test_two_workers_share_one_queue(stack):
    w1, w2 = stack.start(worker_max_batch=2), stack.start(worker_max_batch=2)
    c = stack.client()
    jids = [c.submit(JobSpec(prompt=f"shape {i}", owner="o", steps=4, seed=i)) for i in range(12)]
    for j in jids:
        assert c.wait(j, "o", 120)["status"] == "succeeded"
    by = {stack.record(j)["worker"] for j in jids}
    assert by == {w1.name, w2.name}


def test_cancel_queued_and_running(stack):
    stack.start(worker_max_batch=1)
    c = stack.client()
    long = c.submit(JobSpec(prompt="long", owner="o", steps=150, seed=1))
    queued = c.submit(JobSpec(prompt="queued", owner="o", steps=2, seed=2))
    d = wait_status(c, long, "o", ("running",))
    assert c.get(queued, "o")["status"] == "queued"
    out = subprocess.run([sys.executable, "-m", "rq.cli", "info", "--url", stack.redis.url],
                         capture_output=True, text=True, timeout=60).stdout
    assert "1 executing" in out, out                  # rq info sees our started registry
    assert c.cancel(queued, "o")["status"] == "canceled"
    deadline = time.monotonic() + 60
    while c.get(long, "o")["progress"]["step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    d = c.cancel(long, "o")
    assert d["status"] == "canceled"
    time.sleep(1.0)                                   # the worker drops it at its next step
    after = c.get(long, "o")
    assert after["status"] == "canceled" and after["images"] == []
    assert after["progress"]["step"] < 150
    assert stack.record(queued)["attempt"] == "0"     # the queued one never ran
    nxt = c.submit(JobSpec(prompt="next", owner="o", steps=2))
    assert c.wait(nxt, "o", 60)["status"] == "succeeded"
    # the canceled job was really dropped: its progress stopped moving
    assert c.get(long, "o")["progress"]["step"] == after["progress"]["step"]


def test_failing_job_is_recorded_and_worker_goes_on(shared):
    w = shared
    c = shared.client()
    bad = c.submit(JobSpec(prompt="x", owner="o", width=50, height=64, steps=2))   # not a multiple of 16
    d = c.wait(bad, "o", 60)
    assert d["status"] == "failed" and d["error"]["code"] == "invalid_request"
    assert "width" in d["error"]["message"]
    good = c.submit(JobSpec(prompt="y", owner="o", steps=2))
    assert c.wait(good, "o", 60)["status"] == "succeeded"
    assert w.alive()


def test_timeout_stops_job_and_next_runs(shared):
    c = shared.client()
    slow = c.submit(JobSpec(prompt="slow", owner="o", steps=150, timeout_s=1.0))
    d = c.wait(slow, "o", 60)
    assert d["status"] == "failed" and d["error"]["code"] == "timeout", d
    assert d["finished_at"] - d["started_at"] < 10
    nxt = c.submit(JobSpec(prompt="next", owner="o", steps=2))
    assert c.wait(nxt, "o", 60)["status"] == "succeeded"


def test_file_store(stack, tmp_path):
    stack.start(storage="file", storage_dir=str(tmp_path))
    c = stack.client(storage="file", storage_dir=str(tmp_path))
    jid = c.submit(JobSpec(prompt="file", owner="o", steps=2, n=2))
    assert c.wait(jid, "o", 60)["status"] == "succeeded"
    assert sorted(p.name for p in (tmp_path / jid).iterdir()) == ["0.png", "1.png"]
    assert c.image_bytes(jid, 1, "o").startswith(b"\x89PNG")
    assert not stack.redis.client().exists(keys.image(jid, 0))
    # a JPEG job's file is named for what it holds, and read back by that name
    jpg = c.submit(JobSpec(prompt="file", owner="o", steps=2, output_format="jpeg"))
    assert c.wait(jpg, "o", 60)["status"] == "succeeded"
    assert [p.name for p in (tmp_path / jpg).iterdir()] == ["0.jpeg"]
    assert c.image_bytes(jpg, 0, "o") == (tmp_path / jpg / "0.jpeg").read_bytes()
    assert c.image_bytes(jpg, 0, "o").startswith(b"\xff\xd8\xff")


def test_worker_metrics(shared, tiny_model):
    c = shared.client()
    before = scrape(shared.metrics_port)
    jid = c.submit(JobSpec(prompt="m", owner="team-a", steps=3, n=2))
    assert c.wait(jid, "team-a", 60)["status"] == "succeeded"
    bad = c.submit(JobSpec(prompt="m", owner="team-a", width=50, steps=3))
    assert c.wait(bad, "team-a", 60)["status"] == "failed"
    m = scrape(shared.metrics_port)
    # the work's metrics carry the model the worker serves (named after its folder here)
    model = f'model="{name_of(str(tiny_model))}"'

    def lab(name: str, extra: str = "") -> str:          # the exposition sorts labels by name
        return f"{name}{{{','.join(sorted(x for x in (model, extra) if x))}}}"
    grew = lambda name: m.get(name, 0) - before.get(name, 0)
    assert grew(lab("latentd_worker_images_generated_total")) == 2
    assert grew(lab("latentd_worker_failures_total", 'reason="invalid_request"')) == 1
    assert grew(lab("latentd_worker_compute_seconds_total", 'key="team-a"')) > 0
    assert grew(lab("latentd_worker_unet_calls_total")) >= 3
    for name in ("latentd_worker_queue_wait_seconds_count", "latentd_worker_run_seconds_count",
                 "latentd_worker_step_seconds_count", "latentd_worker_batch_size_count",
                 "latentd_worker_running_requests", "latentd_worker_unet_calls_per_image",
                 "latentd_worker_images_flagged_total", "latentd_worker_model_load_seconds"):
        assert lab(name) in m, name
    assert 'latentd_worker_device_memory_bytes{device="cpu"}' in m
    assert m[lab("latentd_worker_model_load_seconds")] > 0
    # on the CPU: the engine's threads (worker/cpu.py governor) and time spent yielding cores
    assert 1 <= m["latentd_worker_threads"] <= (os.cpu_count() or 1)
    assert m["latentd_worker_throttled_seconds_total"] >= 0


def test_sigterm_finishes_or_hands_back(stack):
    w = stack.start(worker_grace_s=0.5)
    c = stack.client()
    jid = c.submit(JobSpec(prompt="long", owner="o", steps=150))
    wait_status(c, jid, "o", ("running",))
    time.sleep(0.3)
    assert w.terminate(30) == 0
    d = c.get(jid, "o")
    assert d["status"] == "queued", d                 # handed back, not lost, not failed
    rec = stack.record(jid)
    assert rec["graceful"] == "1"
    r = stack.redis.client()
    assert r.lrange(keys.rq_queue("latentd"), 0, -1) == [jid.encode()]
    assert r.zcard(keys.rq_started("latentd")) == 0
    assert not r.exists(keys.worker(w.name))


def test_worker_with_a_bad_model_exits_with_reason(redis_server, tmp_path):
    (tmp_path / "unet").mkdir()
    w = WorkerProc(redis_server.url, str(tmp_path)).start()
    try:
        assert w.proc.wait(120) == 2
        assert "cannot start" in w.output()
        assert not redis_server.client().exists(keys.worker(w.name))   # never looked ready
        assert JobClient(redis_server.client(),
                         Settings(redis_url=redis_server.url)).ready_workers() == []
    finally:
        w.stop()
