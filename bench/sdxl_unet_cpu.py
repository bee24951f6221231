"""SDXL U-Net time per denoising step on the CPU: latentd's U-Net against diffusers'
UNet2DConditionModel holding the very same weights, in the same run, at 1 and 2 threads.

    python bench/sdxl_unet_cpu.py [--size 256] [--depth 1,2,10] [--reps 3] [--threads 1,2]

SDXL base's U-Net layout (block_out_channels 320/640/1280, no attention at the first level, head
dim 64, context 2048, "text_time" added conditioning over a 1280-wide pooled embedding + 6 x 256
Fourier features; Podell et al. 2023, §2.1-2.2) with random weights; --depth sets the transformer
blocks per level (SDXL: 1,2,10; fewer keep the memory and time down on a small machine, and the
run prints the shape it used). One step = one U-Net call on 2 rows (classifier-free guidance:
unconditional + conditional), latent (2, 4, size/8, size/8), float32, channels-last like the
engine. Prints `cat /proc/loadavg` before and after: on a shared machine read the numbers with it.
No assertions: a measurement.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def sdxl_unet_config(depth: tuple[int, int, int]) -> dict:
    """SDXL base's unet/config.json (stabilityai/stable-diffusion-xl-base-1.0), depth per level."""
    return dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20), transformer_layers_per_block=depth, use_linear_projection=True,
                cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, norm_num_groups=32)


def random_diffusers_unet(cfg: dict):
    """diffusers' U-Net with random weights, built without its (slow) default init: normal(0, 0.02)
    for weights, norms at weight 1 / bias 0, so activations stay in range (no denormals)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return unet.eval().requires_grad_(False)


def inputs(size: int):
    g = torch.Generator().manual_seed(1)
    h = size // 8
    x = torch.randn(2, 4, h, h, generator=g)                           # (2, 4, H/8, W/8)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 2048, generator=g)                        # (2, 77, 768 + 1280)
    added = {"text_embeds": torch.randn(2, 1280, generator=g),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)}
    return x, t, ctx, added


def timed(fn, reps: int) -> tuple[float, float]:
    fn()                                                               # warm-up (oneDNN primitives)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--depth", default="1,2,10", help="transformer blocks per level (SDXL: 1,2,10)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args(argv)
    depth = tuple(int(x) for x in a.depth.split(","))
    from latentd.model.config import UNetConfig
    from latentd.model.loader import load_unet

    torch.set_flush_denormal(True)
    print("load before:", open("/proc/loadavg").read().strip(), flush=True)
    t0 = time.perf_counter()
    cfg = sdxl_unet_config(depth)
    ref = random_diffusers_unet(cfg)
    # the same tensors (not copies) loaded into latentd's U-Net; convolutions channels-last as the engine runs
    ours, _ = load_unet(dict(ref.state_dict()), config=UNetConfig.from_diffusers({**cfg, "_class_name": "x"}))
    ours = ours.eval().requires_grad_(False)
    ref = ref.to(memory_format=torch.channels_last)
    n = sum(p.numel() for p in ref.parameters())
    print(f"SDXL-shaped U-Net, transformer depth {depth} (SDXL: (1, 2, 10)), {n / 1e9:.2f} B parameters, "
          f"built in {time.perf_counter() - t0:.0f}s; {a.size}x{a.size} -> latent (2, 4, {a.size // 8}, "
          f"{a.size // 8}), float32; torch {torch.__version__}", flush=True)
    x, t, ctx, added = inputs(a.size)
    with torch.inference_mode():
        diff = (ours(x, t, ctx, added) - ref(x, t, ctx, added_cond_kwargs=added).sample).abs().max().item()
    print(f"max |latentd - diffusers| on the same inputs: {diff:.2e}", flush=True)
    print(f"{'threads':8} {'latentd s/step':>15} {'diffusers s/step':>17} {'latentd/diffusers':>18}   (median of "
          f"{a.reps}; min in brackets)")
    for threads in (int(x) for x in a.threads.split(",")):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            mine = timed(lambda: ours(x, t, ctx, added), a.reps)
            theirs = timed(lambda: ref(x, t, ctx, added_cond_kwargs=added).sample, a.reps)
        print(f"{threads:<8} {mine[0]:>9.2f} [{mine[1]:.2f}] {theirs[0]:>10.2f} [{theirs[1]:.2f}] "
              f"{mine[0] / theirs[0]:>14.2f}", flush=True)
    print("load after:", open("/proc/loadavg").read().strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
