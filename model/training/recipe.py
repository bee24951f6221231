"""The whole recipe of the bundled `shapes` model, deterministic from a seed:

  1. tokenizer   CLIP-style byte-level BPE on the caption words            (bpe.py)
  2. CLIP        text + vision towers, contrastive (Radford et al. 2021)   (clip_train.py)
  3. safety      SD-format checker, "purple triangle" as the unsafe concept (safety_build.py)
  4. VAE         4x KL autoencoder, 64x64x3 -> 16x16x4 (Rombach et al. 2022) (vae_train.py)
  5. U-Net       eps-prediction on latents, 10% caption dropout             (unet_train.py)
                 (Ho et al. 2020 Eq. 14; Ho & Salimans 2022)
  6. decoder     VAE decoder fine-tuning, encoder frozen (latents unchanged) (vae_train.py)
  7. unet_more   the U-Net continued from its EMA weights, fresh lower-LR schedule

and writes a diffusers-layout folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/, safety_checker/, feature_extractor/, latentd.json) that model.pipeline.load_pipeline
loads. The folder is loadable as soon as the U-Net's first checkpoint is written.
`quick=True` runs the same code for a few steps (a test uses it).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

SD_SCHEDULER = {  # Stable Diffusion v1's scheduler config (scaled_linear betas, eps prediction)
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.30.0", "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "clip_sample": False,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": True,
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
LATENTD_DEFAULTS = {"name": "shapes", "default_sampler": "dpmpp_2m", "default_steps": 20,
                    "default_guidance": 5.0}


@dataclass(frozen=True)
class Plan:
    clip_steps: int = 250
    clip_batch: int = 128
    vae_steps: int = 300
    vae_batch: int = 32
    unet_steps: int = 800
    unet_batch: int = 32
    unet_lr: float = 1e-3
    checkpoint_every: int = 100
    safety_pos: int = 512
    safety_neg: int = 2048
    safety_steps: int = 150
    safety_batch: int = 96
    decoder_steps: int = 300
    decoder_batch: int = 32
    unet_more_steps: int = 1100     # continue the EMA U-Net with a fresh, lower-LR cosine schedule
    unet_more_lr: float = 3e-4


QUICK = Plan(clip_steps=3, clip_batch=16, vae_steps=3, vae_batch=4, unet_steps=4, unet_batch=4,
             checkpoint_every=2, safety_pos=16, safety_neg=64, safety_steps=2, safety_batch=6,
             decoder_steps=2, decoder_batch=4, unet_more_steps=2)
STAGES = ("tokenizer", "clip", "safety", "vae", "unet", "decoder", "unet_more")


def _prefixed(src: dict, want: dict, prefix: str) -> dict:
    """Match a transformers sub-module state dict to a wrapper's keys (with or without prefix)."""
    src = {k.removeprefix(prefix): v for k, v in src.items()}
    pre = prefix if all(k.startswith(prefix) for k in want if not k.endswith("position_ids")) else ""
    return {pre + k: v for k, v in src.items() if pre + k in want}


def save_text_encoder(clip, clip_config, out: str) -> None:
    from transformers import CLIPTextModel
    te = CLIPTextModel(clip_config.text_config)
    te.load_state_dict(_prefixed(clip.text_model.state_dict(), te.state_dict(), "text_model."), strict=False)
    for k, v in te.state_dict().items():  # every weight must have come from the trained tower
        if not k.endswith("position_ids"):
            src = _prefixed(clip.text_model.state_dict(), te.state_dict(), "text_model.")
            assert k in src, f"text encoder key {k} not trained"
    te.save_pretrained(os.path.join(out, "text_encoder"), safe_serialization=True)


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def stage_safety(out: str, seed: int, plan: Plan, clip=None, log=print) -> dict:
    """Safety checker from the trained CLIP (read from out/clip when not given)."""
    from transformers import CLIPModel

    from model.training import safety_build
    clip = clip if clip is not None else CLIPModel.from_pretrained(os.path.join(out, "clip")).eval()
    return safety_build.save_safety(clip, clip.config, out, seed, log=log, n_pos=plan.safety_pos,
                                    n_neg=plan.safety_neg, steps=plan.safety_steps, batch=plan.safety_batch)


def stage_decoder(out: str, seed: int, plan: Plan, vae=None, log=print, deadline=None) -> dict:
    """Decoder-only fine-tuning of the VAE (latents unchanged, so the U-Net stays valid)."""
    from model.loader import load_vae
    from model.training import vae_train
    from model.weights import save_module
    t0 = time.time()
    if plan.decoder_steps <= 0:
        return {"seconds": 0.0, "steps": 0}
    if vae is None:
        vae, _ = load_vae(os.path.join(out, "vae"))
        vae.requires_grad_(True)
    vae = vae_train.finetune_decoder(vae, plan.decoder_steps, plan.decoder_batch, seed, log=log, deadline=deadline)
    save_module(vae, vae.config.to_diffusers(), os.path.join(out, "vae"))
    return {"seconds": time.time() - t0, "steps": plan.decoder_steps}


def stage_unet_more(out: str, seed: int, plan: Plan, log=print, deadline=None) -> dict:
    """Continue the U-Net from out/unet (the EMA weights) for plan.unet_more_steps with a fresh
    AdamW and a lower-LR warmup+cosine schedule, on the same frozen VAE encoder / text tower."""
    from model.loader import load_text_encoder, load_tokenizer, load_unet, load_vae
    from model.text import TextEncoder
    from model.training import unet_train
    from model.training.data import CAPTIONS
    from model.weights import save_module
    if plan.unet_more_steps <= 0:
        return {"steps": 0}
    t0 = time.time()
    vae, vcfg = load_vae(os.path.join(out, "vae"))
    unet0, ucfg = load_unet(os.path.join(out, "unet"))
    te = TextEncoder(load_tokenizer(os.path.join(out, "tokenizer")), load_text_encoder(os.path.join(out, "text_encoder")))
    contexts, _ = te.encode(list(CAPTIONS) + [""])

    def checkpoint(ema_unet, step):
        save_module(ema_unet, ucfg.to_diffusers(), os.path.join(out, "unet"))
        log(f"checkpoint: EMA U-Net (continued) at step {step} -> {out}/unet")

    _, ema, hist = unet_train.train_unet(vae, vcfg.scaling_factor, contexts.clone(), ucfg, plan.unet_more_steps,
                                         plan.unet_batch, seed + 100, log=log, lr=plan.unet_more_lr,
                                         deadline=deadline, checkpoint=checkpoint,
                                         checkpoint_every=plan.checkpoint_every, init=unet0.float())
    save_module(ema, ucfg.to_diffusers(), os.path.join(out, "unet"))
    return {"seconds": time.time() - t0, "steps_done": hist[-1][0] + 1 if hist else 0,
            "loss_curve": hist[:: max(1, len(hist) // 20)] + hist[-1:]}


def run(out: str, seed: int = 0, quick: bool = False, minutes_budget: float = 85.0, log=print,
        stages: tuple[str, ...] | None = None) -> dict:
    """Train everything and write the model folder `out`. Returns a summary dict.
    `stages` (subset of STAGES) reruns only the post-training stages "safety" / "decoder" on an
    existing folder (they depend only on out/clip resp. out/vae and the seed)."""
    if stages:
        plan = QUICK if quick else Plan()
        summary = {}
        if "safety" in stages:
            summary["safety"] = stage_safety(out, seed, plan, log=log)
        if "decoder" in stages:
            summary["decoder"] = stage_decoder(out, seed, plan, log=log)
        if "unet_more" in stages:
            summary["unet_more"] = stage_unet_more(out, seed, plan, log=log,
                                                   deadline=time.time() + 60 * minutes_budget)
        return summary
    from model.loader import load_text_encoder, load_tokenizer
    from model.text import TextEncoder
    from model.training import bpe, clip_train, safety_build, unet_train, vae_train
    from model.weights import save_module

    plan = QUICK if quick else Plan()
    t_start = time.time()
    end = t_start + 60 * minutes_budget
    os.makedirs(out, exist_ok=True)
    summary = {"seed": seed, "quick": quick, "plan": asdict(plan), "threads": torch.get_num_threads()}
    log(f"recipe: out={out} seed={seed} quick={quick} plan={plan} threads={torch.get_num_threads()}")

    # 1. tokenizer
    vocab = bpe.build_tokenizer(os.path.join(out, "tokenizer"))
    tok = bpe.load_tokenizer(os.path.join(out, "tokenizer"))

    # 2. CLIP (text tower -> text_encoder/, vision tower -> safety checker, CLIP score)
    t0 = time.time()
    clip = clip_train.train_clip(tok, vocab, plan.clip_steps, plan.clip_batch, seed, log=log)
    clip_cfg = clip.config
    save_text_encoder(clip, clip_cfg, out)
    # The whole CLIP (both towers + projections) for the CLIP score; not part of the SD layout
    # (model_index.json does not list it), so loaders ignore it.
    clip.save_pretrained(os.path.join(out, "clip"), safe_serialization=True)
    summary["clip"] = {"seconds": time.time() - t0,
                       "params": sum(p.numel() for p in clip.parameters()),
                       **clip_train.evaluate_clip(clip, tok, n=128 if quick else 1024)}
    log(f"clip done: {summary['clip']}")

    # 3. safety checker
    summary["safety"] = stage_safety(out, seed, plan, clip=clip, log=log)

    # 4. VAE
    t0 = time.time()
    vae = vae_train.train_vae(plan.vae_steps, plan.vae_batch, seed, log=log,
                              deadline=t_start + 60 * minutes_budget * 0.2)
    scale = vae_train.latent_scale(vae, n=64 if quick else 512)
    vae.config = replace(vae.config, scaling_factor=scale)
    save_module(vae, vae.config.to_diffusers(), os.path.join(out, "vae"))
    summary["vae"] = {"seconds": time.time() - t0, "params": sum(p.numel() for p in vae.parameters()),
                      "scaling_factor": scale}
    log(f"vae done: {summary['vae']}")

    # configs that make the folder loadable once unet/ exists
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), SD_SCHEDULER)
    write_json(os.path.join(out, "model_index.json"), MODEL_INDEX)
    if not os.path.exists(os.path.join(out, "latentd.json")):
        write_json(os.path.join(out, "latentd.json"), LATENTD_DEFAULTS)

    # 5. U-Net on the engine's own text conditioning (exactly what the pipeline will feed it)
    te = TextEncoder(load_tokenizer(os.path.join(out, "tokenizer")),
                     load_text_encoder(os.path.join(out, "text_encoder")))
    from model.training.data import CAPTIONS
    contexts, _ = te.encode(list(CAPTIONS) + [""])                          # (55, 77, D)
    contexts = contexts.clone()
    ucfg = unet_train.make_config(contexts.shape[-1])

    def checkpoint(ema_unet, step):
        save_module(ema_unet, ucfg.to_diffusers(), os.path.join(out, "unet"))
        log(f"checkpoint: EMA U-Net at step {step} -> {out}/unet")

    t0 = time.time()
    unet, ema, hist = unet_train.train_unet(vae, scale, contexts, ucfg, plan.unet_steps, plan.unet_batch, seed,
                                            log=log, lr=plan.unet_lr, deadline=end - 60,
                                            checkpoint=checkpoint, checkpoint_every=plan.checkpoint_every)
    save_module(ema, ucfg.to_diffusers(), os.path.join(out, "unet"))
    summary["unet"] = {"seconds": time.time() - t0, "params": sum(p.numel() for p in ema.parameters()),
                       "steps_done": hist[-1][0] + 1 if hist else 0, "loss_curve": hist[:: max(1, len(hist) // 20)]
                       + hist[-1:]}
    log(f"unet done: {summary['unet']}")

    # 6. decoder fine-tuning (sharper corners from the same latents)
    summary["decoder"] = stage_decoder(out, seed, plan, vae=vae, log=log, deadline=end)
    # 7. more U-Net steps from the EMA weights (lower LR)
    summary["unet_more"] = stage_unet_more(out, seed, plan, log=log, deadline=end)
    summary["total_seconds"] = time.time() - t_start
    log(f"recipe done in {summary['total_seconds'] / 60:.1f} min")
    return summary
