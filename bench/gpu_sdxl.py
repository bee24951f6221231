"""bench/gpu.py's SDXL rows: latentd against diffusers' StableDiffusionXLPipeline on the same
random weights, in the same run.

SDXL base's architecture (U-Net 2.6 B parameters: levels 320/640/1280 with 1/2/10 transformer
blocks, head dim 64, context 2048, "text_time" added conditioning; the VAE at latent scale
0.13025, upcast to float32 as SDXL's VAE needs; CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text
encoders; Podell et al. 2023) with random weights written locally in float16 (no download),
1024x1024, 30 steps, DPM++ 2M, CFG 7.5, no safety checker (SDXL ships none). Rows: s per image,
images/s and peak device memory (weights included: each pipeline is alone on the device while it
runs) at batch 1 and batched. --tiny: the tiny random SDXL of devkit/tiny_sdxl.py at 64x64.
"""
from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import torch

SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                 layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
                sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def build_sdxl(path: Path, device: torch.device) -> Path:
    """SDXL base's architecture with random weights, in float16, in diffusers' folder layout (built
    on `device`: seconds on a GPU). The tokenizers are devkit's byte-level ones (77 tokens)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from devkit.tiny_model import SPECIAL, tokenizer_files, write_tokenizer
    from devkit.tiny_sdxl import SCHEDULER, _write_tokenizer_2

    vocab, _ = tokenizer_files()
    ids = dict(bos_token_id=vocab[SPECIAL[0]], eos_token_id=vocab[SPECIAL[1]], vocab_size=len(vocab),
               max_position_embeddings=77)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu",
                                            pad_token_id=vocab[SPECIAL[1]], **ids))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
            projection_dim=1280, hidden_act="gelu", pad_token_id=vocab["!"], **ids))
    write_tokenizer(path / "tokenizer")
    _write_tokenizer_2(path / "tokenizer_2")
    pipe = StableDiffusionXLPipeline(
        vae=vae.half(), text_encoder=text.half(), text_encoder_2=text_2.half(), unet=unet.half(),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER), force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def sdxl_rows(bench, prompt: str) -> None:
    """The "sdxl" section of bench/gpu.py (`bench` is its Bench: rows, timing, peaks)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    from latentd.model.pipeline import GenerationRequest, load_pipeline

    a = bench.a
    size, steps = (64, 4) if a.tiny else (1024, 30)
    batches = (1, 2) if a.tiny else (1, 4)
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="latentd-bench-sdxl-"))
    if a.tiny:
        from devkit.tiny_sdxl import make_tiny_sdxl
        folder = make_tiny_sdxl(root / "tiny_sdxl")
    else:
        folder = build_sdxl(root / "sdxl", bench.device)
        gc.collect()
        if bench.cuda:
            torch.cuda.empty_cache()
    bench.row("sdxl", "random weights written", note=f"{time.perf_counter() - t0:.0f}s, {folder}")
    cfg = f"{size}x{size} {steps} steps"
    secs: dict[int, float] = {}

    def reqs(b, n_steps, seed0=0):
        return [GenerationRequest(prompt=prompt, width=size, height=size, steps=n_steps, guidance_scale=7.5,
                                  sampler="dpmpp_2m", seed=seed0 + i) for i in range(b)]

    pipe = load_pipeline(str(folder), device=str(bench.device), dtype=bench.dtype, safety=False)
    try:
        for b in batches:
            pipe.generate(reqs(b, 2, 1000))                             # warm-up
            bench.reset_peak()
            dt = bench.timed(lambda: pipe.generate(reqs(b, steps)), reps=2 if b == 1 else 1)
            secs[b] = dt
            bench.row("sdxl", f"latentd batch {b}, {cfg}", s_per_image=dt / b, images_per_s=b / dt,
                      peak_gb=bench.peak_gb(), note="DPM++ 2M, CFG 7.5")
    finally:
        pipe = None
        gc.collect()
        if bench.cuda:
            torch.cuda.empty_cache()
    dp = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=bench.dtype, add_watermarker=False)
    dp = dp.to(bench.device)
    dp.scheduler = DPMSolverMultistepScheduler.from_config(dp.scheduler.config, algorithm_type="dpmsolver++",
                                                           solver_order=2)
    dp.set_progress_bar_config(disable=True)
    try:
        for b in batches:
            def run(n_steps):
                dp(prompt=[prompt] * b, num_inference_steps=n_steps, guidance_scale=7.5, height=size, width=size,
                   generator=[torch.Generator("cpu").manual_seed(i) for i in range(b)])
            run(2)
            bench.reset_peak()
            dt = bench.timed(lambda: run(steps), reps=2 if b == 1 else 1)
            bench.row("sdxl", f"diffusers batch {b}, {cfg}", s_per_image=dt / b, images_per_s=b / dt,
                      peak_gb=bench.peak_gb(),
                      note=f"StableDiffusionXLPipeline, SDPA; latentd / diffusers = {secs[b] / dt:.2f}"
                      if b in secs else "StableDiffusionXLPipeline, SDPA")
    finally:
        dp = None
