"""Admission throughput: jobs accepted per second by POST /v1/jobs with 64 concurrent clients,
API (`latentd serve --workers N`) and Redis on this machine. Target: >= 5,000/s (idle machine,
2 cores).

    .venv/bin/python bench/admission.py [--clients 64] [--seconds 10] [--api-workers 2]

Starts its own redis-server (free port) and API; no worker runs, so jobs just queue (cap and rate
limit lifted for the run). Prints accepted/s, latency percentiles and any non-202 answers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench/ and devkit/ are repository folders, not part of the installed latentd

from bench._stack import RawClient, pct  # noqa: E402
from devkit.api_proc import ALICE, KEYS, ApiProc, configs_only_model, serve_argv  # noqa: E402
from devkit.services import RedisServer  # noqa: E402


async def load(port: int, clients: int, seconds: float, warmup: float) -> dict:
    body = json.dumps({"prompt": "a red circle on a blue square", "size": "64x64", "steps": 10}).encode()
    headers = {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"}
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds
    lat, codes = [], {}

    async def one():
        c = RawClient("127.0.0.1", port)
        await c.connect()
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                status, _ = await c.request("POST", "/v1/jobs", headers, body)
                t1 = time.perf_counter()
                if t0 >= t_measure and t1 <= t_end:
                    lat.append(t1 - t0)
                    codes[status] = codes.get(status, 0) + 1
        finally:
            c.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return {"lat": lat, "codes": codes}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--api-workers", type=int, default=2)
    a = ap.parse_args()
    redis_srv = RedisServer().start()
    port = None
    api = None
    try:
        from devkit.services import free_port

        port = free_port()
        api = ApiProc(redis_srv.url, port=port, argv=serve_argv(port, a.api_workers),
                      api_keys=KEYS, model=configs_only_model(), rate_limit_per_s=10**9, rate_limit_burst=10**9,
                      queue_cap=10**8, log_level="warning").start()
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
        import psutil

        procs = [psutil.Process(api.proc.pid), psutil.Process(redis_srv.proc.pid)]
        procs += psutil.Process(api.proc.pid).children(recursive=True)
        me = psutil.Process()

        def cpu(ps):
            return sum(sum(p.cpu_times()[:2]) for p in ps)

        # CPU seconds spent by the server side (API processes + Redis) and by this client during
        # the measured window: a figure that depends less on what else shares the machine.
        marks = {}

        def mark(name, delay):
            time.sleep(delay)
            marks[name] = (cpu(procs), cpu([me]), time.perf_counter())

        t1 = threading.Thread(target=mark, args=("start", a.warmup))
        t2 = threading.Thread(target=mark, args=("end", a.warmup + a.seconds))
        t1.start(), t2.start()
        res = asyncio.run(load(port, a.clients, a.seconds, a.warmup))
        t1.join(), t2.join()
        server_cpu = marks["end"][0] - marks["start"][0]
        client_cpu = marks["end"][1] - marks["start"][1]
        ok = res["codes"].get(202, 0)
        lat = res["lat"]
        depth = redis_srv.client().llen("rq:queue:latentd")
        print(f"clients={a.clients} api_workers={a.api_workers} seconds={a.seconds:g} cpus={os.cpu_count()} "
              f"load_avg={os.getloadavg()[0]:.1f} before the run")
        print(f"accepted (202): {ok}  -> {ok / a.seconds:,.0f} jobs/s   other: "
              f"{ {k: v for k, v in res['codes'].items() if k != 202} }")
        print(f"latency ms: p50 {pct(lat, 50) * 1e3:.1f}  p95 {pct(lat, 95) * 1e3:.1f}  p99 {pct(lat, 99) * 1e3:.1f}")
        print(f"queue depth after run: {depth}")
        per = server_cpu / max(ok, 1)
        print(f"server CPU (API + Redis): {per * 1e3:.3f} ms per admission -> "
              f"{1 / per:,.0f} admissions per server CPU-second; client CPU {client_cpu / max(ok, 1) * 1e3:.3f} ms/req")
        cores = os.cpu_count() or 1
        print(f"estimate with {cores} dedicated cores (server + client CPU per admission): "
              f"{cores / (per + client_cpu / max(ok, 1)):,.0f} jobs/s")
        print(f"load average during run: {os.getloadavg()[0]:.1f} (other jobs share these {os.cpu_count()} cores)")
        return 0
    finally:
        if api:
            api.stop()
        redis_srv.stop()


if __name__ == "__main__":
    sys.exit(main())
