"""Overload: a burst of 10x the queue cap from many concurrent clients (httpx async)
against a real uvicorn + redis-server (no worker, so nothing drains the queue).

Only 202, 429 and 503 come back, each 429/503 with a Retry-After; the queue never exceeds its
cap (sampled during the burst, and checked against the job records afterwards); nothing is
enqueued for a rejected request; /healthz and GET /v1/jobs/{id} keep answering during the burst
(latencies printed, only a generous sanity bound asserted).
"""
from __future__ import annotations

import asyncio
import statistics
import threading
import time

import httpx
import pytest

from devkit.api_proc import ALICE, BOB, KEYS, ApiProc
from latentd.jobs import keys

CAP = 25
BURST = 10 * CAP
CLIENTS = 25                  # concurrent clients (separate connection pools)
QUEUE = keys.rq_queue("latentd")


@pytest.fixture(scope="module")
def overload_api(module_redis, tiny_model):
    # per-key bucket of 20 (2 keys: up to 40 admitted by rate) > CAP, so both 429 and 503 show up
    proc = ApiProc(module_redis.url, api_keys=KEYS, model=tiny_model, queue_cap=CAP,
                   rate_limit_per_s=0.5, rate_limit_burst=20).start()
    try:
        yield proc
    finally:
        proc.stop()


class QueueSampler(threading.Thread):
    """Reads the queue length every few ms until stopped; keeps the maximum."""

    def __init__(self, r):
        super().__init__(daemon=True)
        self.r, self.max, self.samples, self.stop = r, 0, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.max = max(self.max, self.r.llen(QUEUE))
            self.samples += 1
            time.sleep(0.002)


async def _burst(url: str, existing: str):
    results: list[tuple[int, dict, str | None]] = []
    probes: dict[str, list[float]] = {"healthz": [], "job": []}
    probe_codes: list[tuple[str, int]] = []
    done = asyncio.Event()

    async def client(i: int):
        key = ALICE if i % 2 == 0 else BOB
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                     timeout=60) as c:
            for j in range(BURST // CLIENTS):
                r = await c.post("/v1/jobs", json={"prompt": f"burst {i}.{j}", "size": "64x64",
                                                   "steps": 2})
                jid = r.json().get("id") if r.status_code == 202 else None
                results.append((r.status_code, dict(r.headers), jid))

    async def prober():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ALICE}"},
                                     timeout=60) as c:
            while not done.is_set():
                for name, path in (("healthz", "/healthz"), ("job", f"/v1/jobs/{existing}")):
                    t = time.perf_counter()
                    r = await c.get(path)
                    probes[name].append(time.perf_counter() - t)
                    probe_codes.append((name, r.status_code))
                await asyncio.sleep(0.01)

    p = asyncio.create_task(prober())
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    wall = time.perf_counter() - t0
    done.set()
    await p
    return results, probes, probe_codes, wall


def test_burst_of_ten_times_the_cap(overload_api, module_redis):
    r = module_redis.client()
    r.flushdb()
    with overload_api.client(ALICE) as c:               # a job to read during the burst
        existing = c.post("/v1/jobs", json={"prompt": "before", "size": "64x64"}).json()["id"]
    sampler = QueueSampler(module_redis.client())
    sampler.start()
    try:
        results, probes, probe_codes, wall = asyncio.run(_burst(overload_api.url, existing))
    finally:
        sampler.stop.set()
        sampler.join()

    codes = [s for s, _, _ in results]
    count = {s: codes.count(s) for s in sorted(set(codes))}
    print(f"\n{len(results)} requests in {wall:.2f}s from {CLIENTS} clients: {count}; "
          f"queue max {sampler.max} (cap {CAP}, {sampler.samples} samples)")
    for name, lat in probes.items():
        lat = sorted(lat)
        print(f"  {name} during the burst: {len(lat)} calls, p50 {statistics.median(lat) * 1e3:.1f} ms, "
              f"max {lat[-1] * 1e3:.1f} ms")

    assert len(results) == BURST
    assert set(codes) <= {202, 429, 503}, count
    assert 503 in count and 202 in count, count        # the cap was actually hit
    for status, headers, _ in results:
        if status in (429, 503):
            assert int(headers["retry-after"]) >= 1, headers
    # the queue never exceeded its cap, and holds exactly the admitted jobs
    admitted = {jid for s, _, jid in results if s == 202}
    assert len(admitted) == count[202]
    assert sampler.max <= CAP
    queued = {x.decode() for x in r.lrange(QUEUE, 0, -1)}
    assert queued == admitted | {existing}
    records = {k.decode().rsplit(":", 1)[1] for k in r.keys("latentd:job:*")}
    assert records == admitted | {existing}             # nothing half-made for a rejection
    assert len({k for k in r.keys("rq:job:*")}) == len(records)
    # the probes kept answering (no timing threshold beyond a generous sanity bound)
    assert probes["healthz"] and probes["job"]
    assert {c for _, c in probe_codes} == {200}, probe_codes
    assert max(probes["healthz"] + probes["job"]) < 30


@pytest.fixture(scope="module")
def sync_api(module_redis, tiny_model):
    proc = ApiProc(module_redis.url, api_keys=KEYS, model=tiny_model, queue_cap=10_000,
                   rate_limit_per_s=0, sync_wait_s=120).start()
    try:
        yield proc
    finally:
        proc.stop()


def test_many_sync_waiters_leave_the_probes_answering(sync_api, module_redis):
    """260 clients waiting on the sync endpoint (more than the thread pool's 256): /readyz,
    /v1/models and /metrics (thread-pool routes) and status reads still answer while every one
    of them is still waiting. The check is an ordering, not a time: the probes come back before
    any sync request does (then all jobs are canceled, which ends the waits)."""
    waiters = 260
    r = module_redis.client()
    r.flushdb()

    async def run():
        H = {"Authorization": f"Bearer {ALICE}"}
        finished: list[int] = []
        limits = httpx.Limits(max_connections=waiters + 20)
        async with httpx.AsyncClient(base_url=sync_api.url, headers=H, timeout=120, limits=limits) as c:
            async def sync_call(i):
                resp = await c.post("/v1/images/generations",
                                    json={"prompt": f"wait {i}", "size": "64x64", "steps": 2})
                finished.append(resp.status_code)
                return resp

            tasks = [asyncio.create_task(sync_call(i)) for i in range(waiters)]
            while r.llen(QUEUE) < waiters:                 # all admitted, all waiting
                assert not finished, f"a sync request ended early: {finished[:5]}"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            probes = {}
            for path in ("/readyz", "/v1/models", "/metrics", "/healthz"):
                t = time.perf_counter()
                probes[path] = ((await c.get(path)).status_code, time.perf_counter() - t)
            jid = r.lindex(QUEUE, 0).decode()
            probes["job"] = ((await c.get(f"/v1/jobs/{jid}")).status_code, 0.0)
            done_before = len(finished)
            await asyncio.gather(*(c.delete(f"/v1/jobs/{j.decode()}")    # end the waits
                                   for j in r.lrange(QUEUE, 0, -1)))
            results = await asyncio.gather(*tasks)
        return probes, done_before, results

    probes, done_before, results = asyncio.run(run())
    print(f"\nprobes with {waiters} sync waiters:", {p: (s, f"{dt * 1e3:.0f} ms") for p, (s, dt) in probes.items()})
    assert done_before == 0, "the probes had to wait for sync requests to give up their threads"
    assert probes["/readyz"][0] == 503 and probes["/v1/models"][0] == 200
    assert probes["/metrics"][0] == 200 and probes["/healthz"][0] == 200 and probes["job"][0] == 200
    # canceled while waiting (409); a 503 + Retry-After only if Redis, starved of CPU on a busy
    # machine, timed out on a waiter (the job is canceled either way)
    assert {x.status_code for x in results} <= {409, 503}
    assert all("retry-after" in x.headers for x in results if x.status_code == 503)
