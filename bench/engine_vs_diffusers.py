"""latentd's engine vs diffusers' StableDiffusionPipeline: same random weights, sampler, steps, size.

    .venv/bin/python bench/engine_vs_diffusers.py [--runs 3] [--steps 10] [--size 256]
        [--sampler dpmpp_2m --karras] [--threads 1] [--model DIR]

Builds a mid-size random SD-style model (one U-Net call of batch 2 takes ~50-200 ms on a CPU)
unless --model is given, then runs latentd and diffusers alternately, each measurement in a fresh
subprocess (load, one warm-up image, one timed image), so peak memory (VmHWM from
/proc/self/status; tracemalloc does not see torch's allocations) is per implementation.
Prints the median seconds per image of each, the ratio, and peak RSS. Not a test: no assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench/ and devkit/ are repository folders, not part of the installed latentd
PROMPT = "a red cat and the dog"
SCHEDULERS = {  # latentd sampler -> (diffusers class, extra config)
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def build_model(path: str) -> str:
    """A mid-size random SD1-style diffusers folder (no safety checker) at `path`."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from devkit.tiny_model import SPECIAL, tokenizer_files, write_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32,
                        latent_channels=4, sample_size=256, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    vocab, _ = tokenizer_files()
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4, vocab_size=len(vocab),
        max_position_embeddings=77, bos_token_id=vocab[SPECIAL[0]], eos_token_id=vocab[SPECIAL[1]],
        pad_token_id=vocab[SPECIAL[1]]))
    write_tokenizer(Path(path) / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    sched = PNDMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
                          timestep_spacing="leading")
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path, safe_serialization=True)
    write_tokenizer(Path(path) / "tokenizer")
    return path


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(impl: str, args) -> dict:
    """Runs inside the subprocess: load, warm up, time one image."""
    import torch

    torch.set_num_threads(args.threads)
    size, steps = args.size, args.steps
    if impl == "latentd":
        from latentd.model.pipeline import GenerationRequest, load_pipeline

        pipe = load_pipeline(args.model, safety=False)
        req = GenerationRequest(PROMPT, width=size, height=size, steps=steps, sampler=args.sampler,
                                karras=args.karras, guidance_scale=7.5, seed=1)
        pipe.generate([GenerationRequest(PROMPT, width=size, height=size, steps=2, seed=0)])
        t0 = time.perf_counter()
        out = pipe.generate([req])[0]
        seconds = time.perf_counter() - t0
        breakdown = out.timings
    else:
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None,
                                                                 requires_safety_checker=False)
        cls, extra = SCHEDULERS[args.sampler]
        if args.karras:
            extra = dict(extra, use_karras_sigmas=True)
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
        pipe.set_progress_bar_config(disable=True)
        run = dict(height=size, width=size, guidance_scale=7.5)
        pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **run)
        t0 = time.perf_counter()
        pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(1), **run)
        seconds = time.perf_counter() - t0
        breakdown = {}
    return {"impl": impl, "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "breakdown": breakdown}


def unet_call_ms(model: str, size: int, threads: int) -> float:
    import torch

    from latentd.model.loader import load_unet

    torch.set_num_threads(threads)
    unet, cfg = load_unet(os.path.join(model, "unet"))
    x = torch.randn(2, 4, size // 8, size // 8)
    t = torch.tensor([500.0, 500.0])
    c = torch.randn(2, 77, cfg.cross_attention_dim)
    with torch.inference_mode():
        unet(x, t, c)
        t0 = time.perf_counter()
        for _ in range(3):
            unet(x, t, c)
    return (time.perf_counter() - t0) / 3 * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SCHEDULERS))
    p.add_argument("--karras", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="diffusers folder (default: build a mid-size random one)")
    p.add_argument("--measure", choices=("latentd", "diffusers"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return 0
    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix="latentd-bench-")
        args.model = build_model(tmp.name)
    print(f"model {args.model}: one U-Net call (batch 2, {args.size}x{args.size}) "
          f"{unet_call_ms(args.model, args.size, args.threads):.0f} ms; {args.steps} steps of {args.sampler}"
          f"{'+karras' if args.karras else ''}, {args.threads} thread(s), {args.runs} runs each, interleaved")
    results: dict[str, list[dict]] = {"latentd": [], "diffusers": []}
    for r in range(args.runs):
        order = ("latentd", "diffusers") if r % 2 == 0 else ("diffusers", "latentd")
        for impl in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--measure", impl, "--model", args.model,
                   "--steps", str(args.steps), "--size", str(args.size), "--sampler", args.sampler,
                   "--threads", str(args.threads)] + (["--karras"] if args.karras else [])
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1"))
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[impl].append(res)
            print(f"  run {r} {impl:9s} {res['seconds']:.3f} s/image  peak RSS {res['peak_rss_mb']:.0f} MB",
                  flush=True)
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in results.items()}
    mem = {k: max(x["peak_rss_mb"] for x in v) for k, v in results.items()}
    for k in ("latentd", "diffusers"):
        print(f"{k:9s} median {med[k]:.3f} s/image   peak RSS {mem[k]:.0f} MB")
    print(f"ratio latentd/diffusers = {med['latentd'] / med['diffusers']:.3f}  (target <= 0.9)")
    last = results["latentd"][-1]["breakdown"]
    print("latentd breakdown (last run, s): " + ", ".join(f"{k} {v:.3f}" for k, v in last.items()))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
