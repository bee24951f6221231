"""Priorities benchmark: high-priority latency under a saturating low-priority load, and the
throughput cost of preemption. Prints numbers (and `cat /proc/loadavg`); asserts nothing.

Setup: a real redis-server and one `latentd worker` (LATENTD_WORKER_MAX_BATCH=--max-batch);
jobs go in through JobClient (the API's own submit), times come from the job records
(created_at -> finished_at), so queueing, claiming, parking and decoding all count.

Workload, the same in every mode: --lows low jobs of --low-steps steps submitted at once (they
saturate the worker for the whole run), then --highs jobs of --high-steps steps, one every
--gap seconds. Modes:
  priorities   the highs are `high`: claimed past the full batch, lower rows parked for them,
               and they step alone (LATENTD_WORKER_PRIORITY_ALONE=1, the default)
  shared       the same, but high rows share their U-Net calls with the remaining low rows
               (LATENTD_WORKER_PRIORITY_ALONE=0): the other side of the CPU trade-off
  none         every job `normal`: the load without priorities (FIFO + fairness)
Reported: each mode's high latency p50 / p99 (and / its solo time), the makespan of the whole
workload and its throughput in denoising steps per second (the cost of preemption is the drop
against `none`).

    .venv/bin/python bench/priorities.py [--model PATH] [--max-batch 4] [--lows 12]
        [--low-steps 30] [--highs 6] [--high-steps 10] [--gap 2] [--modes priorities,shared,none]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._stack import pct  # noqa: E402


def loadavg() -> str:
    try:
        return open("/proc/loadavg").read().strip()
    except OSError:
        return "n/a"


def rec_times(r, jid) -> tuple[float, float, float]:
    from latentd.jobs import keys

    created, started, finished = r.hmget(keys.job(jid), "created_at", "started_at", "finished_at")
    return float(created), float(started or 0), float(finished or 0)


def run_mode(redis, model: str, mode: str, a) -> dict:
    from devkit.services import WorkerProc
    from latentd.config.settings import Settings
    from latentd.jobs.client import JobClient
    from latentd.jobs.spec import JobSpec

    redis.client().flushall()
    w = WorkerProc(redis.url, model, worker_max_batch=a.max_batch, progress_interval_s=0.2,
                   worker_priority_alone=int(mode != "shared"), lease_s=30,
                   worker_metrics_port=0).start().wait_ready()
    try:
        c = JobClient(redis.client(), Settings(redis_url=redis.url))
        r = redis.client()
        hp = "normal" if mode == "none" else "high"
        lowp = "normal" if mode == "none" else "low"

        def solo(spec) -> float:
            jid = c.submit(spec)
            assert c.wait(jid, "o", 600)["status"] == "succeeded", w.output()
            cr, _, fin = rec_times(r, jid)
            return fin - cr

        high_spec = lambda i: JobSpec(prompt=f"a red circle {i}", owner="o", steps=a.high_steps,  # noqa: E731
                                      seed=1000 + i, priority=hp)
        solo(high_spec(-1))                                   # warm-up
        solo_high = statistics.median(solo(high_spec(-2 - i)) for i in range(3))
        t0 = time.time()
        lows = [c.submit(JobSpec(prompt=f"a blue square {i}", owner=f"bulk{i % 2}", steps=a.low_steps,
                                 seed=i, priority=lowp)) for i in range(a.lows)]
        highs = []
        time.sleep(a.gap)                                     # the batch is full and running
        for i in range(a.highs):
            highs.append(c.submit(high_spec(i)))
            time.sleep(a.gap)
        deadline = time.time() + 1200
        while time.time() < deadline and any(
                r.hget(f"latentd:job:{j}", "status") not in (b"succeeded", b"failed") for j in lows + highs):
            time.sleep(0.2)
        lat = [(lambda t: t[2] - t[0])(rec_times(r, j)) for j in highs]
        makespan = max(rec_times(r, j)[2] for j in lows + highs) - t0
        steps = a.lows * a.low_steps + a.highs * a.high_steps
        return {"mode": mode, "solo_high_s": solo_high, "p50": pct(lat, 50), "p99": pct(lat, 99),
                "makespan_s": makespan, "steps_per_s": steps / makespan, "load": loadavg()}
    finally:
        w.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--lows", type=int, default=12)
    p.add_argument("--low-steps", type=int, default=30)
    p.add_argument("--highs", type=int, default=6)
    p.add_argument("--high-steps", type=int, default=10)
    p.add_argument("--gap", type=float, default=2.0)
    p.add_argument("--modes", default="priorities,shared,none")
    a = p.parse_args()
    from devkit.services import RedisServer

    model = a.model
    if model is None:
        bundled = os.path.join(ROOT, "models", "shapes")
        if os.path.isdir(bundled):
            model = bundled
        else:
            from devkit.tiny_model import make_tiny_sd
            model = str(make_tiny_sd(tempfile.mkdtemp(prefix="tiny_sd_"), variant="sd1", safety=True, seed=0))
    print(f"model {model}; max batch {a.max_batch}; {a.lows} low x {a.low_steps} steps, "
          f"{a.highs} high x {a.high_steps} steps every {a.gap:g}s")
    print(f"loadavg before: {loadavg()}  (cores: {os.cpu_count()})")
    redis = RedisServer().start()
    rows = []
    try:
        for mode in a.modes.split(","):
            row = run_mode(redis, model, mode, a)
            rows.append(row)
            print(f"{row['mode']:>10}: high solo {row['solo_high_s']:.2f}s  p50 {row['p50']:.2f}s "
                  f"({row['p50'] / row['solo_high_s']:.1f}x solo)  p99 {row['p99']:.2f}s "
                  f"({row['p99'] / row['solo_high_s']:.1f}x)  makespan {row['makespan_s']:.1f}s  "
                  f"{row['steps_per_s']:.1f} steps/s  load {row['load']}", flush=True)
    finally:
        redis.stop()
    base = next((r for r in rows if r["mode"] == "none"), None)
    if base:
        for r in rows:
            if r is not base:
                print(f"{r['mode']}: throughput {100 * (r['steps_per_s'] / base['steps_per_s'] - 1):+.1f}% "
                      f"vs none; high p50 {r['p50']:.2f}s vs {base['p50']:.2f}s without priorities")
    print(f"loadavg after: {loadavg()}")


if __name__ == "__main__":
    main()
