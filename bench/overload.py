"""Overload bench: open-loop Poisson arrivals at 2x the measured capacity, then 0.5x.

Starts a whole stack on loopback (redis-server with a maxmemory bound, the API with a queue cap,
`--workers` workers on the tiny model), measures capacity (jobs/s with the queue kept full),
then sends POST /v1/jobs as a Poisson process at --over x capacity for --over-s seconds and
--under x capacity for --under-s seconds, whatever the answers. Prints:

  - admitted / completed / lost / duplicated (every admitted job must complete exactly once)
  - refusals by status, whether each had Retry-After, and their answer time p50/p99 (<= 50 ms)
  - queue length, API RSS and Redis used_memory peaks against their configured bounds
  - time to recover: from the switch to 0.5x until refusals stop and job latency (created ->
    finished) is back within 2x its unloaded value
  - the load average (os.getloadavg) before, during and after: the numbers mean little on a
    busy machine

    python bench/overload.py                     # 60 s at 2x, 30 s at 0.5x
    python bench/overload.py --over-s 15 --under-s 15 --workers 1
Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit.api_proc import ALICE, KEYS, ApiProc  # noqa: E402
from devkit.services import FAST, RedisServer, WorkerProc  # noqa: E402
from latentd.jobs import keys  # noqa: E402

BODY = {"prompt": "a red circle", "size": "64x64", "steps": 4}
TERMINAL = (b"succeeded", b"failed", b"canceled")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def load() -> str:
    return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


async def post(c: httpx.AsyncClient, out: list, phase: str):
    t = time.monotonic()
    try:
        r = await c.post("/v1/jobs", json=BODY)
        status, ra = r.status_code, r.headers.get("retry-after")
        jid = r.json().get("id") if status in (200, 202) else None
    except httpx.HTTPError:
        status, ra, jid = 0, None, None
    out.append((phase, t, time.monotonic() - t, status, ra, jid))


async def poisson(c, rate: float, seconds: float, out: list, phase: str):
    tasks, end = [], time.monotonic() + seconds
    nxt = time.monotonic()
    while True:
        nxt += random.expovariate(rate)
        if nxt >= end:
            break
        await asyncio.sleep(max(0.0, nxt - time.monotonic()))
        tasks.append(asyncio.create_task(post(c, out, phase)))
    await asyncio.gather(*tasks)


async def sampler(r, api_pid: int, samples: list, stop: asyncio.Event):
    while not stop.is_set():
        mem = await asyncio.to_thread(r.info, "memory")
        samples.append((time.monotonic(), await asyncio.to_thread(r.llen, keys.rq_queue("latentd")),
                        rss_mb(api_pid), mem["used_memory"] / 2**20, os.getloadavg()[0]))
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


def measure_capacity(c: httpx.Client, r, seconds: float) -> float:
    """Jobs/s completed with the queue kept non-empty (closed loop, 4x the workers' batch)."""
    done0 = time.monotonic()
    ids, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        if r.llen(keys.rq_queue("latentd")) < 8:
            resp = c.post("/v1/jobs", json=BODY)
            if resp.status_code == 202:
                ids.append(resp.json()["id"])
        else:
            time.sleep(0.01)
    finished = sum(r.hget(keys.job(j), "status") == b"succeeded" for j in ids)
    return finished / (time.monotonic() - done0)


def job_latency(r, jid: str) -> float | None:
    c, f = r.hmget(keys.job(jid), "created_at", "finished_at")
    return float(f) - float(c) if c and f else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--over", type=float, default=2.0)
    ap.add_argument("--under", type=float, default=0.5)
    ap.add_argument("--over-s", type=float, default=60.0)
    ap.add_argument("--under-s", type=float, default=30.0)
    ap.add_argument("--capacity-s", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--queue-cap", type=int, default=40)
    ap.add_argument("--redis-maxmemory-mb", type=int, default=256)
    ap.add_argument("--model", default=None, help="model folder (default: a tiny random one)")
    a = ap.parse_args()
    print(f"start: {load()}", flush=True)
    model = a.model
    if model is None:
        from devkit.tiny_model import make_tiny_sd

        model = str(make_tiny_sd(Path(tempfile.mkdtemp(prefix="latentd-bench-")), variant="sd1",
                                 safety=True, seed=0))
    redis = RedisServer().start()
    r = redis.client()
    r.config_set("maxmemory", a.redis_maxmemory_mb * 2**20)
    api, workers = None, []
    try:
        api = ApiProc(redis.url, api_keys=KEYS, model=model, rate_limit_per_s=0,
                      queue_cap=a.queue_cap).start()
        workers = [WorkerProc(redis.url, model, **FAST).start() for _ in range(a.workers)]
        for w in workers:
            w.wait_ready(300)
        with api.client(ALICE) as c:
            base = [c.post("/v1/jobs", json=BODY).json()["id"] for _ in range(3)]
            for j in base:
                while r.hget(keys.job(j), "status") not in TERMINAL:
                    time.sleep(0.02)
            unloaded = pct([job_latency(r, j) for j in base], 0.5)
            cap = measure_capacity(c, r, a.capacity_s)
        print(f"capacity {cap:.2f} jobs/s ({a.workers} worker(s), steps={BODY['steps']}), unloaded job "
              f"latency {unloaded * 1e3:.0f} ms, queue cap {a.queue_cap}; {load()}", flush=True)

        async def run():
            out, samples, stop = [], [], asyncio.Event()
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {ALICE}"},
                                         timeout=30, limits=limits) as ac:
                samp = asyncio.create_task(sampler(r, api.proc.pid, samples, stop))
                t0 = time.monotonic()
                await poisson(ac, a.over * cap, a.over_s, out, "over")
                print(f"  end of {a.over}x: {load()}", flush=True)
                switch = time.monotonic()
                await poisson(ac, a.under * cap, a.under_s, out, "under")
                stop.set()
                await samp
            return out, samples, t0, switch

        out, samples, t0, switch = asyncio.run(run())
        print(f"  end of {a.under}x: {load()}", flush=True)
        ids = [o[5] for o in out if o[5]]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(s in TERMINAL for s in (r.hget(keys.job(j), "status") for j in ids)):
                break
            time.sleep(0.2)
        statuses = [r.hget(keys.job(j), "status") for j in ids]
        completed = statuses.count(b"succeeded")
        dup = sum(int(r.hget(keys.job(j), "done") or 0) > 1 for j in ids)   # n=1 each
        refused = [o for o in out if o[3] not in (200, 202)]
        by_status: dict = {}
        for o in refused:
            by_status[o[3]] = by_status.get(o[3], 0) + 1
        no_ra = sum(1 for o in refused if not o[4])
        ok_lat = [o[2] for o in out if o[3] in (200, 202)]
        ref_lat = [o[2] for o in refused]
        # recovery: last refusal after the switch; first time job latency is back within 2x
        last_ref = max((o[1] for o in refused if o[1] >= switch), default=switch)
        lat_after = sorted((o[1], job_latency(r, o[5])) for o in out if o[5] and o[1] >= switch)
        # "normal": 2x the unloaded latency, or 1.2x the median of the run's last 5 s at 0.5x
        # (a steady 0.5x load batches, so its latency is not the one-job latency)
        tail = [l for t, l in lat_after if l is not None and t >= switch + a.under_s - 5]
        normal = max(2 * unloaded, 1.2 * pct(tail, .5)) if tail else 2 * unloaded
        back = next((t for t, l in lat_after if l is not None and l <= normal and t >= last_ref), None)
        print(f"\noffered {len(out)} requests ({sum(o[0] == 'over' for o in out)} at {a.over}x for "
              f"{a.over_s:g} s, {sum(o[0] == 'under' for o in out)} at {a.under}x for {a.under_s:g} s)")
        print(f"admitted {len(ids)}  completed {completed}  lost {len(ids) - completed}  duplicated {dup}")
        print(f"refused {len(refused)} {dict(sorted(by_status.items()))} ({len(refused) / max(1, len(out)):.0%}); "
              f"without Retry-After: {no_ra}; refusal answer time p50 {pct(ref_lat, .5) * 1e3:.1f} ms "
              f"p99 {pct(ref_lat, .99) * 1e3:.1f} ms; admitted answer p50 {pct(ok_lat, .5) * 1e3:.1f} ms "
              f"p99 {pct(ok_lat, .99) * 1e3:.1f} ms")
        print(f"peaks: queue {max(s[1] for s in samples)} (cap {a.queue_cap}), API RSS "
              f"{max(s[2] for s in samples):.0f} MB, Redis used_memory {max(s[3] for s in samples):.1f} MB "
              f"(maxmemory {a.redis_maxmemory_mb} MB), load avg 1m peak {max(s[4] for s in samples):.2f}")
        print(f"recovery after the switch to {a.under}x: last refusal +{last_ref - switch:.1f} s; job latency "
              f"back to normal (<= {normal * 1e3:.0f} ms) for jobs sent at " +
              (f"+{back - switch:.1f} s" if back else "never (within the run)"))
        print(f"end: {load()}")
    finally:
        for w in workers:
            w.stop()
        if api:
            api.stop()
        redis.stop()


if __name__ == "__main__":
    main()
