"""The engine on a shared CPU: seconds per image of the bundled model (the worker's work: one
request at a time, 20 steps, CFG), with the machine idle and with 1 and 2 busy neighbour
processes (a pure-Python loop each, like an API process, Redis or a test runner), for several
OpenMP settings. Each setting runs in a fresh subprocess, since OpenMP reads its environment once.

    python bench/cpu_contention.py [--images 6] [--settings latentd passive default]

Settings: "latentd" = worker/cpu.py's choice (threads = usable cores, short GOMP spin, and the
ThreadGovernor giving torch only the cores other processes leave free, as the worker does),
"default" = OpenMP's defaults (what the worker did before), "passive" = OMP_WAIT_POLICY=PASSIVE,
"spin:N" = GOMP_SPINCOUNT=N, "threads:N" = N threads with the latentd spin.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

CHILD = r"""
import json, os, statistics, time
import torch
from latentd.model.pipeline import GenerationRequest, load_pipeline
pipe = load_pipeline(None)
req = lambda s: GenerationRequest(prompt="a red circle on a white background", steps=20, seed=s)
cb = None
if {governor}:                                            # what the worker and `generate` do
    from latentd.worker.cpu import ThreadGovernor
    gov = ThreadGovernor(torch.get_num_threads(), torch.set_num_threads)
    cb = lambda *a: gov.tick()
pipe.generate([req(0)], callback=cb)                      # warm-up
ts = []
for i in range({n}):
    t0 = time.perf_counter(); pipe.generate([req(i + 1)], callback=cb); ts.append(time.perf_counter() - t0)
print(json.dumps({{"median": statistics.median(ts), "threads": torch.get_num_threads()}}))
"""


def busy(stop):
    x = 0
    while not stop.is_set():
        for _ in range(10000):
            x += 1


def child_env(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if setting == "latentd":
        from latentd.worker import cpu
        cpu.configure(0, env)
    elif setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif setting.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = setting.split(":")[1]
    elif setting.startswith("threads:"):
        from latentd.worker import cpu
        cpu.configure(int(setting.split(":")[1]), env)
    return env


def run(setting: str, neighbours: int, n: int) -> dict:
    stop = mp.Event()
    procs = [mp.Process(target=busy, args=(stop,), daemon=True) for _ in range(neighbours)]
    for p in procs:
        p.start()
    try:
        t0 = time.time()
        code = CHILD.format(n=n, governor=setting in ("latentd", "governor"))
        out = subprocess.run([sys.executable, "-c", code], env=child_env(setting),
                             capture_output=True, text=True, timeout=1800)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["wall"] = time.time() - t0
        r["load"] = os.getloadavg()[0]
        return r
    finally:
        stop.set()
        for p in procs:
            p.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--neighbours", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["latentd", "default", "passive"])
    args = ap.parse_args()
    print(f"cores {os.cpu_count()}, load before {os.getloadavg()}")
    for s in args.settings:
        row = {}
        for k in args.neighbours:
            r = run(s, k, args.images)
            row[k] = r["median"]
            print(f"{s:>12}  neighbours {k}: {r['median']:.3f} s/image (median of {args.images}, "
                  f"{r['threads']} threads, load {r['load']:.2f})", flush=True)
        if 0 in row:
            print(f"{s:>12}  slow-down vs its idle: " + ", ".join(f"{k} busy {row[k] / row[0]:.2f}x"
                                                              for k in row if k), flush=True)


if __name__ == "__main__":
    main()
