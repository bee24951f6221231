"""The whole recipe of the bundled `shapes` model, deterministic from a seed:

  1. tokenizer   CLIP-style byte-level BPE on the caption words            (bpe.py)
  2. CLIP        text + vision towers, contrastive (Radford et al. 2021)   (clip_train.py)
  3. VAE         4x KL autoencoder, 64x64x3 -> 16x16x4 (Rombach et al. 2022) (vae_train.py),
                 then its gate: the checker on reconstructions of fresh images
  4. U-Net       eps-prediction on latents, 10% caption dropout, Min-SNR-5  (unet_train.py)
                 (Ho et al. 2020 Eq. 14; Ho & Salimans 2022; Hang et al. 2023)
  5. safety      SD-format checker, "purple triangle" as the unsafe concept (safety_build.py),
                 its concept fit on drawn AND generated images (after the U-Net)
  6. classifier  noise-aware p(color, shape, background | z_t, t) on the VAE's latents, for
                 classifier guidance (Dhariwal & Nichol 2021)      (classifier_train.py)

and writes a diffusers-layout folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/, safety_checker/, feature_extractor/, latentd.json) that model.pipeline.load_pipeline
loads. The folder is loadable as soon as the U-Net's first checkpoint is written.
`quick=True` runs the same code for a few steps (a test uses it).

Resumable: finished stages are listed in <out>/.train/state.json and the VAE and U-Net save their
full training state there; `run(out, resume=True)` (`latentd train-shapes --resume DIR`) skips
what is done and continues a stage where a deadline stopped it. An evaluation of a caption subset
is logged every `eval_every` U-Net steps beside the loss, so the log holds the learning curve.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

from latentd.training.unet_train import UNetTrainConfig

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
    vae_steps: int = 3000
    vae_batch: int = 64
    unet: UNetTrainConfig = UNetTrainConfig()
    checkpoint_every: int = 200
    eval_every: int = 400            # U-Net steps between two subset evaluations in the log
    eval_subset: int = 18            # captions (x 1 seed) judged at each evaluation
    vae_gate_n: int = 120            # fresh images reconstructed for the VAE gate
    safety_pos: int = 512
    safety_neg: int = 2048
    safety_steps: int = 150
    safety_batch: int = 96
    safety_generated_seeds: int = 8  # generated images per caption for the safety concept fit
    classifier_steps: int = 4000
    classifier_batch: int = 256
    classifier_images: int = 32768  # latents encoded once, re-noised at every step


QUICK = Plan(clip_steps=3, clip_batch=16, vae_steps=3, vae_batch=4,
             unet=UNetTrainConfig(steps=4, batch=4, warmup=1), checkpoint_every=2, eval_every=4, eval_subset=3,
             vae_gate_n=8, safety_pos=16, safety_neg=64, safety_steps=2, safety_batch=6, safety_generated_seeds=1,
             classifier_steps=2, classifier_batch=8, classifier_images=16)
STAGES = ("tokenizer", "clip", "vae", "unet", "safety", "classifier")


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


class Run:
    """State of one recipe run in <out>/.train: finished stages and the summary so far."""

    def __init__(self, out: str, seed: int, plan: Plan, log, deadline: float | None):
        self.out, self.seed, self.plan, self.log, self.deadline = out, seed, plan, log, deadline
        self.dir = os.path.join(out, ".train")
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, "state.json")
        st = json.load(open(self.path)) if os.path.exists(self.path) else {}
        if st and st.get("seed") != seed:
            raise ValueError(f"{self.path}: a run with seed {st.get('seed')} is in progress, not {seed}")
        self.done: list[str] = st.get("done", [])
        self.summary: dict = st.get("summary", {"seed": seed, "plan": asdict(plan)})

    def save(self) -> None:
        write_json(self.path, {"seed": self.seed, "done": self.done, "summary": self.summary})

    def finish(self, stage: str, result: dict) -> None:
        self.summary[stage] = {**self.summary.get(stage, {}), **result}
        self.done.append(stage)
        self.save()

    def time_left(self) -> bool:
        return self.deadline is None or time.time() < self.deadline


def stage_tokenizer(r: Run) -> dict:
    from latentd.training import bpe
    return {"vocab": bpe.build_tokenizer(os.path.join(r.out, "tokenizer"))}


def stage_clip(r: Run) -> dict:
    """CLIP: text tower -> text_encoder/ (the U-Net's conditioning); the whole model -> clip/ (for
    the CLIP score and the safety checker; model_index.json does not list it, so loaders ignore it)."""
    from latentd.training import bpe, clip_train
    t0 = time.time()
    tok = bpe.load_tokenizer(os.path.join(r.out, "tokenizer"))
    vocab = r.summary["tokenizer"]["vocab"]
    clip = clip_train.train_clip(tok, vocab, r.plan.clip_steps, r.plan.clip_batch, r.seed, log=r.log)
    save_text_encoder(clip, clip.config, r.out)
    clip.save_pretrained(os.path.join(r.out, "clip"), safe_serialization=True)
    return {"seconds": time.time() - t0, "params": sum(p.numel() for p in clip.parameters()),
            **clip_train.evaluate_clip(clip, tok, n=128 if r.plan is QUICK else 1024)}


def stage_vae(r: Run) -> dict | None:
    """The autoencoder, its latent scale, and the gate: the checker on reconstructions of fresh
    images (mean latent), measured before any U-Net trains on its latents."""
    from latentd.training import evaluate, vae_train
    from latentd.model.weights import save_module
    t0 = time.time()
    vae, finished = vae_train.train_vae(r.plan.vae_steps, r.plan.vae_batch, r.seed, log=r.log, deadline=r.deadline,
                                        state_path=os.path.join(r.dir, "vae.pt"))
    if not finished:
        return None
    scale = vae_train.latent_scale(vae, n=64 if r.plan is QUICK else 512)
    vae.config = replace(vae.config, scaling_factor=scale)
    save_module(vae, vae.config.to_diffusers(), os.path.join(r.out, "vae"))
    gate = evaluate.vae_fidelity(vae, r.plan.vae_gate_n)
    r.log(f"vae gate on {gate['n']} fresh images: {evaluate.fmt(gate['reconstruction'])}")
    return {"seconds": time.time() - t0, "steps": r.plan.vae_steps, "batch": r.plan.vae_batch,
            "params": sum(p.numel() for p in vae.parameters()), "scaling_factor": scale, "gate": gate}


def caption_contexts(out: str) -> torch.Tensor:
    """(55, 77, D): the engine's own text encoding of the 54 captions, then of "" (unconditional),
    exactly what the pipeline feeds the U-Net."""
    from latentd.model.loader import load_text_encoder, load_tokenizer
    from latentd.model.text import TextEncoder
    from latentd.training.data import CAPTIONS
    te = TextEncoder(load_tokenizer(os.path.join(out, "tokenizer")), load_text_encoder(os.path.join(out, "text_encoder")))
    contexts, _ = te.encode(list(CAPTIONS) + [""])
    return contexts.clone()


def context_separation(contexts: torch.Tensor) -> dict:
    """How distinct the captions' conditionings are: pairwise cosine of the mean-pooled states."""
    pooled = torch.nn.functional.normalize(contexts[:-1].mean(1), dim=-1)       # (54, D)
    cos = pooled @ pooled.T
    off = cos[~torch.eye(len(cos), dtype=torch.bool)]
    return {"max_pairwise_cosine": float(off.max()), "mean_pairwise_cosine": float(off.mean())}


def stage_unet(r: Run) -> dict | None:
    from latentd.model.loader import load_vae
    from latentd.training import evaluate, unet_train
    from latentd.model.weights import save_module
    t0 = time.time()
    vae, vcfg = load_vae(os.path.join(r.out, "vae"))
    contexts = caption_contexts(r.out)
    ucfg = unet_train.make_config(contexts.shape[-1])
    tc = replace(r.plan.unet, seed=r.seed)
    trainer = unet_train.Trainer(vae.requires_grad_(False), vcfg.scaling_factor, contexts, ucfg, tc)
    curve = r.summary.setdefault("unet", {}).setdefault("eval_curve", [])

    def checkpoint(ema_unet, step):
        save_module(ema_unet, ucfg.to_diffusers(), os.path.join(r.out, "unet"))

    def evaluate_subset(ema_unet, step):
        from latentd.model.pipeline import load_pipeline
        te = time.time()
        pipe = load_pipeline(r.out, safety=False)
        d = read_defaults(r.out)
        caps = evaluate.caption_list(r.plan.eval_subset)
        images, truth, _, _ = evaluate.generate(pipe, caps, 1, d["default_guidance"], d["default_steps"],
                                                d["default_sampler"])
        res = evaluate.judge(images, truth)
        curve.append({"step": step, "samples": step * tc.batch, **{k: res[k] for k in evaluate.ATTRS}})
        r.save()
        r.log(f"eval at step {step} ({step * tc.batch} samples, {len(caps)} captions, guidance "
              f"{d['default_guidance']}): {evaluate.fmt(res)} [{time.time() - te:.0f}s]")

    unet_train.run(trainer, os.path.join(r.dir, "unet.pt"), log=r.log, deadline=r.deadline, checkpoint=checkpoint,
                   checkpoint_every=r.plan.checkpoint_every, evaluate=evaluate_subset, eval_every=r.plan.eval_every)
    prev = r.summary["unet"].get("seconds", 0.0)
    r.summary["unet"]["seconds"] = prev + time.time() - t0
    r.save()
    if not trainer.done:
        return None
    hist = trainer.history
    return {"params": sum(p.numel() for p in trainer.ema.model.parameters()), "steps": tc.steps,
            "batch": tc.batch, "samples": tc.steps * tc.batch, "context_separation": context_separation(contexts),
            "loss_curve": hist[:: max(1, len(hist) // 20)] + hist[-1:],
            "samples_per_s": trainer.samples_per_s[:: max(1, len(trainer.samples_per_s) // 20)]}


def stage_safety(r: Run) -> dict:
    """Safety checker from the trained CLIP, its concept fit on drawn and generated images."""
    from transformers import CLIPModel

    from latentd.training import safety_build
    clip = CLIPModel.from_pretrained(os.path.join(r.out, "clip")).eval()
    return safety_build.save_safety(clip, clip.config, r.out, r.seed, log=r.log, n_pos=r.plan.safety_pos,
                                    n_neg=r.plan.safety_neg, steps=r.plan.safety_steps, batch=r.plan.safety_batch,
                                    generated_seeds=r.plan.safety_generated_seeds)


def stage_classifier(r: Run) -> dict:
    from latentd.model.classifier import save_classifier
    from latentd.model.loader import load_vae
    from latentd.training import classifier_train
    t0 = time.time()
    vae, vcfg = load_vae(os.path.join(r.out, "vae"))
    clf = classifier_train.train_classifier(vae, vcfg.scaling_factor, r.plan.classifier_steps,
                                            r.plan.classifier_batch, r.seed, log=r.log,
                                            images=r.plan.classifier_images)
    acc = classifier_train.accuracy_by_t(clf, vae, vcfg.scaling_factor, n=64 if r.plan is QUICK else 512)
    save_classifier(clf, os.path.join(r.out, "classifier"), extra={"accuracy_by_t": acc})
    r.log(f"classifier accuracy by t: {acc}")
    return {"seconds": time.time() - t0, "steps": r.plan.classifier_steps, "batch": r.plan.classifier_batch,
            "params": sum(p.numel() for p in clf.parameters()), "accuracy_by_t": acc}


def read_defaults(out: str) -> dict:
    with open(os.path.join(out, "latentd.json")) as f:
        return {**LATENTD_DEFAULTS, **json.load(f)}


STAGE_FUNCS = {"tokenizer": stage_tokenizer, "clip": stage_clip, "vae": stage_vae, "unet": stage_unet,
               "safety": stage_safety, "classifier": stage_classifier}


def run(out: str, seed: int = 0, quick: bool = False, minutes_budget: float | None = None, log=print,
        stages: tuple[str, ...] | None = None, resume: bool = False) -> dict:
    """Train the stages (all, or `stages`) into the model folder `out`; returns the summary.
    resume=True skips the stages a previous run finished and continues an interrupted one; a
    stage stopped by the minutes budget leaves its state for the next `resume`."""
    plan = QUICK if quick else Plan()
    deadline = time.time() + 60 * minutes_budget if minutes_budget else None
    os.makedirs(out, exist_ok=True)
    r = Run(out, seed, plan, log, deadline)
    if not resume and not stages:
        r.done, r.summary = [], {"seed": seed, "plan": asdict(plan)}
        for f in ("vae.pt", "unet.pt"):
            if os.path.exists(os.path.join(r.dir, f)):
                os.remove(os.path.join(r.dir, f))
    r.summary["threads"] = torch.get_num_threads()
    r.save()
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), SD_SCHEDULER)
    write_json(os.path.join(out, "model_index.json"), MODEL_INDEX)
    if not os.path.exists(os.path.join(out, "latentd.json")):
        write_json(os.path.join(out, "latentd.json"), LATENTD_DEFAULTS)
    log(f"recipe: out={out} seed={seed} quick={quick} plan={plan} threads={torch.get_num_threads()} "
        f"done={r.done}")
    for name in STAGES:
        if (stages and name not in stages) or (resume and name in r.done):
            continue
        if not r.time_left():
            log(f"recipe: time budget spent before stage {name}; `--resume` continues")
            break
        log(f"stage {name}")
        t0 = time.time()
        res = STAGE_FUNCS[name](r)
        if res is None:
            log(f"recipe: stage {name} stopped by the time budget; `--resume` continues")
            break
        if name in r.done:
            r.done.remove(name)
        r.finish(name, {"wall_seconds_last": time.time() - t0, **res})
        log(f"stage {name} done in {(time.time() - t0) / 60:.1f} min")
    if all(s in r.done for s in STAGES):
        for f in ("vae.pt", "unet.pt"):     # the folder ships without training state
            if os.path.exists(os.path.join(r.dir, f)):
                os.remove(os.path.join(r.dir, f))
    return r.summary
