"""What LoRA adapters cost in latentd's engine (per-row low-rank deltas, never merged).

    .venv/bin/python bench/lora_cost.py [--runs 3] [--threads 2] [--skip-sd15]

1. Throughput, bundled model: 16 requests (different prompts and seeds, 20 DPM++ 2M steps, CFG 5)
   in one step-batched run, spread over 4 different adapters (4 requests each) against the same
   16 with no adapter, for two adapter shapes: the common LoRA (attention, feed-forward and
   projections, rank 8) and LoCon on every Linear/Conv2d of the U-Net and text encoder at rank
   16 (the bundled star adapter's shape, large next to the bundled model's 32-128 channels).
2. Per-row cost of an adapter at rank 4, 16 and 64: one U-Net call of 8 rows, every row with an
   adapter on every U-Net Linear/Conv2d vs none, on the bundled model (64 px) and on SD-1.5-shaped
   random weights (256 px; attention, feed-forward and projection layers, the usual LoRA targets,
   since LoCon on SD 1.5's convs is far larger), as (time with - time without) / 8.
3. An adapter's first load (read + bind + to the model's dtype): the rank-16 bundled-model file
   and SD-1.5-shaped files at rank 16 and 64.
Prints medians over --runs with the load average. Not a test: no assertions.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from devkit.lora_files import write_random_lora  # noqa: E402

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def load():
    return f"load average {os.getloadavg()[0]:.2f}"


def write_lora(shapes: dict, path: Path, rank: int, seed: int, targets=None, parts=("unet", "text_encoder")):
    return write_random_lora(shapes, path, rank, seed, parts, targets=targets, scale=0.05)


def throughput(pipe, tmp: Path, runs: int):
    from latentd.model.pipeline import GenerationRequest
    kinds = {"attention-only LoRA, rank 8": dict(rank=8, targets=ATTN_TARGETS),
             "LoCon on every layer + text encoder, rank 16 (the star adapter's shape)": dict(rank=16, targets=None)}
    prompts = [f"a {COLORS[i % 6]} {SHAPES[i % 3]} on a white background" for i in range(16)]

    def reqs(adapters):
        return [GenerationRequest(p, steps=20, guidance_scale=5.0, sampler="dpmpp_2m", seed=100 + i,
                                  loras=((adapters[i % 4], 1.0),) if adapters else ())
                for i, p in enumerate(prompts)]

    def rate(adapters):
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            pipe.generate(reqs(adapters))
            times.append(time.perf_counter() - t0)
        return 16 / statistics.median(times)
    pipe.generate(reqs(None)[:2])                                        # warm-up
    for label, kw in kinds.items():
        adapters = [pipe.load_lora(write_lora(pipe.lora_shapes, tmp / f"t{kw['rank']}_{i}.safetensors", kw["rank"],
                                              i, kw["targets"])) for i in range(4)]
        base, mixed = rate(None), rate(adapters)
        print(f"  16 requests: no adapter {base:.2f} images/s, 4 different adapters ({label}) {mixed:.2f} images/s: "
              f"{mixed / base:.2f}x (medians of {runs}; {load()})", flush=True)


def per_row(pipe, tmp: Path, size: int, runs: int, targets, label: str):
    import torch

    from latentd.model import lora_runtime
    from latentd.model.lora_runtime import RowMix
    f = pipe.info.vae_factor
    rows = 8
    x = torch.randn(rows, pipe.info.latent_channels, size // f, size // f).contiguous(memory_format=torch.channels_last)
    t = torch.full((rows,), 500.0)
    d = pipe.unet.config.cross_attention_dim
    ctx = torch.randn(rows, 77, d)

    def timed(mix):
        with torch.inference_mode(), lora_runtime.active(mix):
            pipe.unet(x, t, ctx)
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                pipe.unet(x, t, ctx)
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    base = timed(None)
    print(f"  {label}: U-Net call of {rows} rows without adapters {base * 1000:.1f} ms ({load()})", flush=True)
    for rank in (4, 16, 64):
        a = pipe.load_lora(write_lora(pipe.lora_shapes, tmp / f"{label}_r{rank}.safetensors", rank, rank, targets,
                                      parts=("unet",)))
        w = timed(RowMix([((a, 1.0),)] * rows))
        print(f"  {label}: rank {rank:>2} on every row: {w * 1000:.1f} ms, per row +{(w - base) / rows * 1000:.2f} ms "
              f"(+{(w - base) / base:.1%}; {a.nbytes / 2**20:.1f} MiB of weights; {load()})", flush=True)


def first_load(pipe, path: Path, label: str, runs: int):
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        pipe.load_lora(path)
        ts.append(time.perf_counter() - t0)
    print(f"  first load, {label} ({path.stat().st_size / 2**20:.1f} MiB): {statistics.median(ts) * 1000:.1f} ms "
          f"({load()})", flush=True)


class Sd15:
    """An SD-1.5-shaped U-Net with random weights and what lora_format.load needs of a pipeline
    (the VAE and text encoder are not timed here)."""

    def __init__(self):
        from types import SimpleNamespace

        import torch

        from devkit.sd15 import SD15_UNET
        from latentd.model import lora_runtime
        from latentd.model.config import UNetConfig
        from latentd.model.unet import UNet
        torch.manual_seed(0)
        self.unet = UNet(UNetConfig.from_diffusers(SD15_UNET)).eval().requires_grad_(False)
        self.unet = self.unet.to(memory_format=torch.channels_last)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.info = SimpleNamespace(family="sd", vae_factor=8, latent_channels=4)
        lora_runtime.attach(self.unet, "unet")
        self.lora_shapes = lora_runtime.layer_shapes(self.unet, "unet")

    def load_lora(self, path):
        from latentd.model import lora_format
        return lora_format.load(self, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-sd15", action="store_true")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from latentd.model.pipeline import load_pipeline
    print(f"lora_cost: {args.threads} threads, {os.cpu_count()} CPUs, {load()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pipe = load_pipeline(None, safety=False)
        print("throughput (bundled model, 64x64, 20 steps, CFG 5):")
        throughput(pipe, tmp, args.runs)
        print("per-row cost:")
        per_row(pipe, tmp, 64, max(args.runs, 5), None, "bundled 64px")
        first_load(pipe, tmp / "t16_0.safetensors", "bundled model, rank 16, U-Net + text encoder", args.runs)
        if not args.skip_sd15:
            big = Sd15()
            per_row(big, tmp, 256, 2, ATTN_TARGETS, "SD-1.5-shaped 256px")
            for rank in (16, 64):
                first_load(big, tmp / f"SD-1.5-shaped 256px_r{rank}.safetensors", f"SD-1.5-shaped, rank {rank}", args.runs)


if __name__ == "__main__":
    main()
