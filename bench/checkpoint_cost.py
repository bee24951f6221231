"""Cost of checkpoints (row states saved every LATENTD_CHECKPOINT_EVERY_STEPS steps, worker/
checkpoint.py) on a worker's batch throughput. Prints numbers; asserts nothing.

Two real `latentd worker` processes on one redis-server and the bundled model, one with the
default checkpoint settings and one with checkpoints off, each on its own queue; rounds of
--jobs jobs (n = 1, --steps steps, distinct prompts and seeds) are submitted at once to one
worker, then the other (the order alternates per round), and each round's images/s is the
jobs over the wall time from submit to the last one's end. Reported: the median over rounds of
the on/off throughput ratio (each ratio compares runs made back to back under the same machine
load), the worker's own time spent saving (latentd_worker_checkpoint_seconds_total) as a share
of its run, the rows saved, and `cat /proc/loadavg` before and after (the machine is shared).

    .venv/bin/python bench/checkpoint_cost.py [--jobs 16] [--steps 20] [--repeat 3] [--model PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench/ and devkit/ are repository folders, not part of the installed latentd
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default=None, help="default: the bundled models/shapes")
    args = ap.parse_args()

    from devkit.services import RedisServer, WorkerProc, free_port, scrape
    from latentd.config.settings import Settings
    from latentd.jobs import keys
    from latentd.jobs.client import JobClient
    from latentd.jobs.spec import JobSpec
    from latentd.model.info import BUNDLED

    model = args.model or BUNDLED
    default_k = Settings().checkpoint_every_steps
    print(f"model {model}; {args.jobs} jobs x {args.steps} steps per round, {args.repeat} rounds; "
          f"checkpoints every {default_k} steps (default) vs off")
    print(f"loadavg before: {loadavg()}")
    redis = RedisServer().start()
    workers = {}
    try:
        confs = {"on": {}, "off": {"checkpoint_every_steps": 0, "checkpoint_every_s": 0}}
        for mode, over in confs.items():
            workers[mode] = WorkerProc(redis.url, model, queue_name=f"bench_{mode}", worker_max_batch=16,
                                       worker_metrics_port=free_port(), **over).start()
        for w in workers.values():
            w.wait_ready(300)
        r = redis.client()
        clients = {m: JobClient(redis.client(), Settings(redis_url=redis.url, queue_name=f"bench_{m}",
                                                         queue_cap=10_000)) for m in confs}

        def round_(mode: str, base: int) -> float:
            c = clients[mode]
            t0 = time.perf_counter()
            jids = [c.submit(JobSpec(prompt=f"a {COLORS[i % 6]} {SHAPES[i // 6 % 3]}", owner="bench",
                                     steps=args.steps, seed=base + i)) for i in range(args.jobs)]
            for j in jids:
                d = c.wait(j, "bench", 600)
                assert d and d["status"] == "succeeded", (d, workers[mode].output())
            return args.jobs / (time.perf_counter() - t0)

        round_("on", 10**6)                 # warm both (first calls, allocator) before measuring
        round_("off", 10**6)
        ratios, rates = [], {"on": [], "off": []}
        for i in range(args.repeat):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            got = {m: round_(m, 1000 * (i + 1)) for m in order}
            for m in got:
                rates[m].append(got[m])
            ratios.append(got["on"] / got["off"])
            print(f"round {i + 1}: on {got['on']:.3f} img/s, off {got['off']:.3f} img/s, "
                  f"on/off {ratios[-1]:.3f}")
        port = int(r.hget(keys.worker(workers["on"].name), "metrics_port"))
        m = scrape(port)

        def total(prefix):
            return sum(v for s, v in m.items() if s.startswith(prefix))

        ck_s, rows = total("latentd_worker_checkpoint_seconds_total"), total("latentd_worker_checkpoint_rows_total")
        run_s = total("latentd_worker_run_seconds_sum")
        steps_s = total("latentd_worker_step_seconds_sum")
        med = statistics.median(ratios)
        print(f"median throughput on/off: {med:.3f} (cost {100 * (1 - med):+.1f} %); "
              f"medians on {statistics.median(rates['on']):.3f}, off {statistics.median(rates['off']):.3f} img/s")
        print(f"worker with checkpoints: {rows:.0f} rows saved in {ck_s:.3f} s "
              f"({1000 * ck_s / max(rows, 1):.2f} ms a row), {100 * ck_s / max(steps_s, 1e-9):.2f} % of its "
              f"U-Net step time ({steps_s:.1f} s; job run time summed over jobs {run_s:.1f} s)")
    finally:
        for w in workers.values():
            w.stop()
        redis.stop()
        print(f"loadavg after: {loadavg()}")


if __name__ == "__main__":
    main()
