"""Serving speed against what users would otherwise run: the same 16 images (bundled model, 64x64,
20 DPM++ 2M steps, CFG 5, 16 different prompts and seeds, safety checker on) three ways, in one run:

  latentd      16 concurrent clients POST /v1/images/generations (b64_json) to the whole service:
               uvicorn + redis-server + one `latentd worker` (step-level batching, PNG encoding);
  one at a time  diffusers' StableDiffusionPipeline, one request per call (a naive diffusers
               server, or A1111, which runs one request at a time);
  one batch    the same pipeline given all 16 prompts (and 16 generators) in one call: the best a
               batcher that needs equal parameters can do.

Every contender gets the same threads (--threads, default 2). Prints images/s of each (median of
--repeat rounds, each round running the three back to back) and latentd's ratios, with the load
average. Not a test: no assertions.

    .venv/bin/python bench/serving_speed.py [--repeat 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

N, STEPS, GUIDANCE, SIZE = 16, 20, 5.0, 64
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
BGS = ("white", "black", "gray")


def prompt(i: int) -> str:
    return f"a {COLORS[i % 6]} {SHAPES[i // 6 % 3]} on a {BGS[i // 2 % 3]} background"


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}"


def latentd_round(url: str, key: str) -> float:
    import httpx
    errors = []

    def one(i: int):
        body = {"prompt": prompt(i), "size": f"{SIZE}x{SIZE}", "steps": STEPS, "guidance_scale": GUIDANCE,
                "sampler": "dpmpp_2m", "seed": 100 + i, "response_format": "b64_json"}
        r = httpx.post(f"{url}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"},
                       timeout=600)
        if r.status_code != 200:
            errors.append(r.text)
        else:
            base64.b64decode(r.json()["data"][0]["b64_json"])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(N)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"latentd answered errors: {errors[:2]}")
    return N / dt


def diffusers_pipe(model: str):
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_round(pipe, batched: bool) -> float:
    import torch
    gens = [torch.Generator("cpu").manual_seed(100 + i) for i in range(N)]
    prompts = [prompt(i) for i in range(N)]
    t0 = time.perf_counter()
    if batched:
        pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, generator=gens)
    else:
        for p, g in zip(prompts, gens):
            pipe(p, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, generator=g)
    return N / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from devkit.api_proc import ALICE, service_stack
    from latentd.model.info import BUNDLED
    print(f"serving_speed: {N} images, {SIZE}x{SIZE}, {STEPS} dpmpp_2m steps, CFG {GUIDANCE}, "
          f"{args.threads} threads each, {load()}", flush=True)
    pipe = diffusers_pipe(BUNDLED)
    diffusers_round(pipe, True)                                   # warm-up
    rows = {"latentd, 16 concurrent clients": [], "diffusers, one at a time": [], "diffusers, one batch of 16": []}
    with service_stack(BUNDLED, worker_max_batch=N, cpu_threads=args.threads) as s:
        url = s["api"].url
        latentd_round(url, ALICE)                                 # warm-up
        for r in range(args.repeat):
            for name, fn in (("latentd, 16 concurrent clients", lambda: latentd_round(url, ALICE)),
                             ("diffusers, one at a time", lambda: diffusers_round(pipe, False)),
                             ("diffusers, one batch of 16", lambda: diffusers_round(pipe, True))):
                v = fn()
                rows[name].append(v)
                print(f"  round {r + 1}: {name}: {v:.2f} images/s ({load()})", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    for k, v in med.items():
        print(f"{k}: {v:.2f} images/s (median of {args.repeat})")
    ours = med["latentd, 16 concurrent clients"]
    print(f"latentd / diffusers one at a time: {ours / med['diffusers, one at a time']:.2f}x (target >= 3)")
    print(f"latentd / diffusers one batch of 16: {ours / med['diffusers, one batch of 16']:.2f}x (target >= 1.0)")
    print(load())


if __name__ == "__main__":
    main()
