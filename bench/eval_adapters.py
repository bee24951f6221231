"""The bundled adapters and step caching, judged by the repository's shape checker
(training/shape_checker.py) through the engine; prints every figure with the load average.

    .venv/bin/python bench/eval_adapters.py star      # the star LoRA's targets
    .venv/bin/python bench/eval_adapters.py lcm       # the few-step LCM adapter's
    .venv/bin/python bench/eval_adapters.py deepcache # cache_interval 1, 2, 3, 5 at the defaults

star: 18 star captions x 4 seeds at the model's defaults with the adapter at scale 1 (star,
colour, background rates), the same without it (how often the base model draws a star), the
54 original captions x 4 seeds with the adapter (all three right), and scale 0 against the base
model's image (bit for bit, a few captions).
lcm: 54 captions x 4 seeds with the lcm sampler at guidance 1 (no unconditional rows), 4 and 2
steps, all three right, and the cost per image against a default request (20 DPM++ 2M steps with
CFG) in the same run.
deepcache: 54 captions x 4 seeds at the defaults, cache_interval 1, 2, 3, 5: all three right and
the time per image (batches of 18); and U-Net time per step on SD-1.5-shaped random weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from latentd.training import evaluate  # noqa: E402


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}"


def pct(r: dict, k: str) -> str:
    return f"{100 * r[k]:.1f} %"


def star(pipe, lib, seeds: int, out: dict) -> None:
    info = pipe.info
    kw = dict(steps=info.default_steps, sampler=info.default_sampler)
    w = info.default_guidance
    adapter = lib.resolve([("star", 1.0)])
    caps = evaluate.star_captions()
    for label, loras in (("with the star adapter", adapter), ("base model (no adapter)", ())):
        imgs, truth, _, per = evaluate.generate(pipe, caps, seeds, w, loras=loras, **kw)
        r = evaluate.judge(imgs, truth)
        out[label] = r
        print(f"  18 star captions x {seeds} seeds, {label}: star {pct(r, 'shape')}, colour {pct(r, 'color')}, "
              f"background {pct(r, 'background')}, all three {pct(r, 'all')} ({per * 1000:.0f} ms/image; {load()})",
              flush=True)
    imgs, truth, _, per = evaluate.generate(pipe, evaluate.caption_list(), seeds, w, loras=adapter, **kw)
    r = evaluate.judge(imgs, truth)
    out["original captions with the adapter"] = r
    print(f"  54 original captions x {seeds} seeds with the adapter: all three {pct(r, 'all')} "
          f"({evaluate.fmt(r)}; {load()})", flush=True)
    zero = lib.resolve([("star", 0.0)])
    same = []
    for c in evaluate.star_captions()[:6]:
        a, _, _, _ = evaluate.generate(pipe, [c], 1, w, **kw)
        b, _, _, _ = evaluate.generate(pipe, [c], 1, w, loras=zero, **kw)
        same.append(np.array_equal(np.asarray(a[0]), np.asarray(b[0])))
    out["scale 0 equals the base model"] = all(same)
    print(f"  scale 0 gives the base model's image bit for bit: {sum(same)}/{len(same)}")


def lcm(pipe, lib, seeds: int, out: dict) -> None:
    adapter = lib.resolve([("lcm", 1.0)])
    caps = evaluate.caption_list()
    info = pipe.info
    _, _, _, default_per = evaluate.generate(pipe, caps[:18], 1, info.default_guidance,
                                             info.default_steps, info.default_sampler)
    print(f"  default request ({info.default_steps} {info.default_sampler} steps, CFG "
          f"{info.default_guidance}): {default_per * 1000:.1f} ms/image ({load()})", flush=True)
    for steps in (4, 2, 1, 8):
        imgs, truth, _, per = evaluate.generate(pipe, caps, seeds, 1.0, steps, "lcm", loras=adapter)
        r = evaluate.judge(imgs, truth)
        r["ms_per_image"] = per * 1000
        r["cost_vs_default"] = per / default_per
        out[f"lcm {steps} steps"] = r
        print(f"  lcm, {steps} steps, guidance 1, 54 captions x {seeds} seeds: all three {pct(r, 'all')} "
              f"({evaluate.fmt(r)}); {per * 1000:.1f} ms/image = {per / default_per:.3f}x a default request "
              f"({load()})", flush=True)
    imgs, truth, _, _ = evaluate.generate(pipe, caps, seeds, 1.0, 4, "lcm")
    r = evaluate.judge(imgs, truth)
    out["lcm 4 steps without the adapter"] = r
    print(f"  the base model with the lcm sampler, 4 steps, no adapter: all three {pct(r, 'all')} ({load()})")


def deepcache(pipe, seeds: int, out: dict) -> None:
    info = pipe.info
    caps = evaluate.caption_list()
    base = None
    for n in (1, 2, 3, 5):
        imgs, truth, _, per = evaluate.generate(pipe, caps, seeds, info.default_guidance, info.default_steps,
                                                info.default_sampler, cache_interval=n)
        r = evaluate.judge(imgs, truth)
        base = base or per
        r["ms_per_image"], r["speedup"] = per * 1000, base / per
        out[f"cache_interval {n}"] = r
        print(f"  cache_interval {n}: all three {pct(r, 'all')} ({evaluate.fmt(r)}); {per * 1000:.1f} ms/image, "
              f"{base / per:.2f}x ({load()})", flush=True)


def deepcache_sd15(size: int, runs: int, out: dict) -> None:
    """U-Net time per step on SD-1.5-shaped random weights: a full step (the plain U-Net), a
    cached step (the shallow path, model/deepcache.py), and their mix for N = 1, 2, 3, 5."""
    import statistics

    from devkit.sd15 import SD15_UNET
    from latentd.model import deepcache as dc
    from latentd.model.config import UNetConfig
    from latentd.model.unet import UNet
    torch.manual_seed(0)
    unet = UNet(UNetConfig.from_diffusers(SD15_UNET)).eval().requires_grad_(False)
    unet = unet.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, size // 8, size // 8).contiguous(memory_format=torch.channels_last)
    t, ctx = torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)

    def timed(fn):
        fn()
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    with torch.inference_mode():
        _, feats = dc.forward(unet, x, t, ctx, None, [0, 1], None)
        full = timed(lambda: unet(x, t, ctx))
        shallow = timed(lambda: dc.forward(unet, x, t, ctx, None, [], feats))
    print(f"  SD-1.5-shaped U-Net, {size}x{size}, batch 2 (one request with CFG): full step {full * 1000:.0f} ms, "
          f"cached step {shallow * 1000:.0f} ms ({load()})", flush=True)
    steps = 20
    for n in (1, 2, 3, 5):
        k = sum(dc.full_step(i, steps, n) for i in range(steps))
        per = (k * full + (steps - k) * shallow) / steps
        out[f"sd15 {size}px cache_interval {n}"] = {"ms_per_step": per * 1000, "speedup": full / per, "full_steps": k}
        print(f"  cache_interval {n}: {k} of {steps} steps full, {per * 1000:.0f} ms per step on average, "
              f"{full / per:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("star", "lcm", "deepcache"))
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sd15-size", type=int, default=256, help="deepcache: image size for the SD-1.5-shaped U-Net")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from latentd.model.info import BUNDLED
    from latentd.model.lora_library import LoraLibrary
    from latentd.model.pipeline import load_pipeline
    pipe = load_pipeline(None, safety=False)
    lib = LoraLibrary(pipe, model_dir=BUNDLED)
    print(f"eval_adapters {args.what}: {args.threads} threads, {load()}")
    out: dict = {}
    t0 = time.time()
    {"star": lambda: star(pipe, lib, args.seeds, out), "lcm": lambda: lcm(pipe, lib, args.seeds, out),
     "deepcache": lambda: (deepcache(pipe, args.seeds, out),
                           deepcache_sd15(args.sd15_size, 3, out))}[args.what]()
    print(f"done in {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
