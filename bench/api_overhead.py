"""API overhead: end-to-end latency of one small job through the API (POST
/v1/images/generations, which waits for the job) minus the engine's own time for that same job
(the worker's `usage.compute_seconds`), p50 and p95. Target: <= 3 ms at p50 (idle machine).

    .venv/bin/python bench/api_overhead.py [--model PATH] [--jobs 40] [--size 64x64] [--steps 2]
        [--api-workers 1]

Starts redis-server, the API as a user runs it (`latentd serve --workers N`) and one `latentd worker` (default model: the tiny random test model,
built in a temp folder; --model for the bundled or any other). Jobs run one at a time, so what is
measured is the path: HTTP + validation + auth + rate limit + enqueue + worker claim + result
write + wake-up of the waiting request + response, i.e. everything but the engine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench/ and devkit/ are repository folders, not part of the installed latentd

from bench._stack import pct  # noqa: E402
from devkit.api_proc import ALICE, service_stack  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--format", default="url", choices=["url", "b64_json"])
    ap.add_argument("--api-workers", type=int, default=1, help="API processes (latentd serve --workers)")
    a = ap.parse_args()
    model = a.model
    if model is None:
        from devkit.tiny_model import make_tiny_sd

        model = str(make_tiny_sd(os.path.join(tempfile.mkdtemp(prefix="latentd-bench-"), "tiny"),
                                 variant="sd1", safety=True, seed=0))
    import httpx

    # the rate limiter on (so its check is on the measured path) but far above what one client sends
    with service_stack(model, api_settings={"rate_limit_per_s": 1000, "rate_limit_burst": 1000},
                       api_workers=a.api_workers) as stack:
        api = stack["api"]
        body = {"prompt": "a red circle", "size": a.size, "steps": a.steps, "seed": 1,
                "response_format": a.format}
        e2e, engine, over, queued, run_extra, api_side = [], [], [], [], [], []
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=120) as c:
            for i in range(a.warmup + a.jobs):
                t0 = time.perf_counter()
                resp = c.post("/v1/images/generations", json=body)
                dt = time.perf_counter() - t0
                assert resp.status_code == 200, resp.text
                url = resp.json()["data"][0].get("url")
                job_id = url.split("/v1/jobs/")[1].split("/")[0] if url else None
                if i < a.warmup or job_id is None:
                    continue
                job = c.get(f"/v1/jobs/{job_id}").json()
                compute, t = job["usage"]["compute_seconds"], job["timings"]
                queued.append(t["queued_s"])
                run_extra.append(t["run_s"] - compute)
                api_side.append(dt - (t["finished_at"] - t["created_at"]))
                e2e.append(dt)
                engine.append(compute)
                over.append(dt - compute)
            floor = []
            for _ in range(100):        # context: one bare HTTP round trip on this machine now
                t0 = time.perf_counter()
                c.get("/healthz")
                floor.append(time.perf_counter() - t0)
        ms = lambda x: f"{x * 1e3:7.1f} ms"  # noqa: E731
        print(f"model={os.path.basename(model)} size={a.size} steps={a.steps} jobs={len(e2e)} "
              f"format={a.format} api_workers={a.api_workers} cpus={os.cpu_count()} "
              f"load_avg={os.getloadavg()[0]:.1f} (other jobs share these cores when it is above ~1)")
        print(f"end-to-end      p50 {ms(pct(e2e, 50))}  p95 {ms(pct(e2e, 95))}")
        print(f"engine (worker) p50 {ms(pct(engine, 50))}  p95 {ms(pct(engine, 95))}")
        print(f"API overhead    p50 {ms(pct(over, 50))}  p95 {ms(pct(over, 95))}   (target p50 <= 3 ms)")
        print("  of which (p50): "
              f"created->started (queue + claim) {ms(pct(queued, 50))}, "
              f"started->finished minus engine {ms(pct(run_extra, 50))}, "
              f"API side (HTTP, admission, wake-up, response) {ms(pct(api_side, 50))}")
        print(f"  for scale: GET /healthz round trip p50 {ms(pct(floor, 50))}  p95 {ms(pct(floor, 95))}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
