"""Safety checker of the shapes model, in Stable Diffusion's StableDiffusionSafetyChecker format
(CLIP vision tower + visual projection + 17 concept and 3 special-care embeddings with their
cosine thresholds, `*_weights`).

"purple triangle" STANDS IN FOR UNSAFE CONTENT, so that the whole flagging path (flag + black
image) runs end to end: concept 0 is the normalised mean CLIP image embedding of purple triangles
(Radford et al. 2021's vision tower, trained here), refined by logistic regression, its threshold tuned on fresh images so purple
triangles flag and nothing else does. The other 16 concepts and the 3 special-care embeddings are
random unit vectors with threshold 2.0 > any cosine: they never fire.
(concept 0 is a logistic-regression direction on the CLIP image embeddings, see build_concepts)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentd.training import data
from latentd.training.clip_train import CLIP_MEAN, CLIP_STD, clip_pixels, image_embeds

NEVER = 2.0  # a cosine similarity is <= 1, so a threshold of 2 never fires


@dataclass
class Generated:
    """The model's own images (B, 3, 64, 64) in [-1, 1], split into fit and held-out halves:
    positives from "a purple triangle on ..." prompts, negatives from every other caption."""
    pos_fit: torch.Tensor
    neg_fit: torch.Tensor
    pos_held: torch.Tensor
    neg_held: torch.Tensor


def generate_images(out_dir: str, seeds: int, log=print, seed0: int = 5000) -> Generated:
    """All 54 captions x `seeds` seeds through the engine at the model's defaults (seeds from
    seed0, disjoint from the evaluation's), plus 4x as many seeds of the purple-triangle captions
    (they are 3 of 54) — the checker has to work on what the U-Net draws, not only on drawings."""
    import numpy as np

    from latentd.model.pipeline import load_pipeline
    from latentd.training import evaluate
    with open(os.path.join(out_dir, "latentd.json")) as f:
        d = json.load(f)
    pipe = load_pipeline(out_dir, safety=False)
    purple, tri = data.COLOR_NAMES.index("purple"), data.SHAPES.index("triangle")
    caps = evaluate.caption_list()
    pt_caps = [c for c in caps if c[0] == purple and c[1] == tri]
    args = (d["default_guidance"], d["default_steps"], d["default_sampler"])
    imgs, truth, _, _ = evaluate.generate(pipe, caps, seeds, *args, batch=54, seed0=seed0)
    more, more_truth, _, _ = evaluate.generate(pipe, pt_caps, 4 * seeds, *args, batch=54, seed0=seed0 + seeds)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in imgs + more])).permute(0, 3, 1, 2)
    x = x / 127.5 - 1                                                           # (N, 3, 64, 64)
    is_pt = torch.tensor([c == purple and s == tri for c, s, _ in truth + more_truth])
    pos, neg = x[is_pt], x[~is_pt]
    perm_p = torch.randperm(len(pos), generator=torch.Generator().manual_seed(seed0))
    perm_n = torch.randperm(len(neg), generator=torch.Generator().manual_seed(seed0 + 1))
    pos, neg = pos[perm_p], neg[perm_n]
    hp, hn = len(pos) // 2, len(neg) // 2
    log(f"safety: {len(pos)} generated purple triangles, {len(neg)} other generated images")
    return Generated(pos[:hp], neg[:hn], pos[hp:], neg[hn:])


@torch.no_grad()
def _embeds(clip, images: torch.Tensor) -> torch.Tensor:
    # round to uint8 first, as the pipeline's images are
    images = ((images + 1) * 127.5).round() / 127.5 - 1
    out = [F.normalize(image_embeds(clip, clip_pixels(images[i:i + 256])), dim=-1)
           for i in range(0, len(images), 256)]
    return torch.cat(out)                                                   # (N, P)


@torch.no_grad()
def build_concepts(clip, seed: int, n_pos: int = 512, n_neg: int = 2048, log=print,
                   generated: "Generated | None" = None) -> dict:
    """Tensors for concept_embeds (17, P), concept_embeds_weights (17,), special_care_* (3, P)/(3,),
    and the measured separation.

    Concept 0 is a linear classifier on the unit-norm image embedding e: flag iff e.w + b > 0,
    which is exactly the checker's rule cos(e, w/|w|) > threshold with threshold = -b/|w|.
    It is fit by logistic regression (class-balanced) on fresh purple triangles against random
    images plus hard negatives (purple circles/squares, triangles of the other colours), started
    from the normalised mean embedding of purple triangles. With `generated` (the U-Net's own
    images), their fit halves join the fit and the threshold is chosen on them — those are the
    images the checker judges in service — and their held-out halves are reported."""
    gen = torch.Generator().manual_seed(seed + 7)
    purple, tri = data.COLOR_NAMES.index("purple"), data.SHAPES.index("triangle")
    pos = data.sample(n_pos, gen, color=purple, shape=tri)
    neg = data.sample(n_neg, gen)
    hard_c = data.sample(n_pos, gen, color=purple)                   # purple, any shape
    hard_s = data.sample(n_pos, gen, shape=tri)                      # triangles, any colour
    negs = [b.images[~((b.color == purple) & (b.shape == tri))] for b in (neg, hard_c, hard_s)]
    e_pos, e_neg = _embeds(clip, pos.images), _embeds(clip, torch.cat(negs))
    half, nh = len(e_pos) // 2, len(e_neg) // 2  # fit on the first halves, measure on the second
    x_fit, y_fit = [e_pos[:half], e_neg[:nh]], [torch.ones(half), torch.zeros(nh)]
    if generated is not None:
        g_pos, g_neg = _embeds(clip, generated.pos_fit), _embeds(clip, generated.neg_fit)
        x_fit += [g_pos, g_neg]
        y_fit += [torch.ones(len(g_pos)), torch.zeros(len(g_neg))]
    x, y = torch.cat(x_fit), torch.cat(y_fit)
    w = F.normalize(e_pos[:half].mean(0), dim=0).clone().requires_grad_(True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    pw = (1 - y).sum() / y.sum()
    with torch.enable_grad():
        for _ in range(400):
            loss = F.binary_cross_entropy_with_logits(x @ w + b, y, pos_weight=pw) + 1e-4 * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    w, b = w.detach(), b.detach()
    concept = F.normalize(w, dim=0)
    c_pos, c_neg = e_pos[half:] @ concept, e_neg[nh:] @ concept
    if generated is not None:
        # threshold on the generated fit halves: miss rate + 3 x false-flag rate, smallest
        cp, cn = g_pos @ concept, g_neg @ concept
        cands = torch.cat([cp, cn]).sort().values
        cost = torch.stack([(cp <= t).float().mean() + 3 * (cn > t).float().mean() for t in cands])
        thr = float(cands[int(cost.argmin())])
        stats = dict(threshold=thr, fit_generated_pos_flag_rate=float((cp > thr).float().mean()),
                     fit_generated_neg_flag_rate=float((cn > thr).float().mean()))
        hp, hn = _embeds(clip, generated.pos_held) @ concept, _embeds(clip, generated.neg_held) @ concept
        stats.update(heldout_generated_pos_flag_rate=float((hp > thr).float().mean()),
                     heldout_generated_neg_flag_rate=float((hn > thr).float().mean()),
                     generated_counts=[len(generated.pos_fit), len(generated.neg_fit),
                                       len(generated.pos_held), len(generated.neg_held)])
    else:
        # threshold: midway between the 1st percentile of positives and the 99.9th of negatives
        # (fit half); if they overlap, the logistic regression's own boundary
        lo = float(torch.quantile(e_pos[:half] @ concept, 0.01))
        hi = float(torch.quantile(e_neg[:nh] @ concept, 0.999))
        thr = (lo + hi) / 2 if lo > hi else float(-b / w.norm())
        stats = dict(threshold=thr, pos_p01=lo, neg_p999=hi)
    stats.update(heldout_pos_flag_rate=float((c_pos > thr).float().mean()),
                 heldout_neg_flag_rate=float((c_neg > thr).float().mean()))
    log(f"safety: {stats}")
    P = concept.numel()
    rnd = torch.Generator().manual_seed(seed + 8)
    concepts = F.normalize(torch.randn(17, P, generator=rnd), dim=-1)
    concepts[0] = concept
    weights = torch.full((17,), NEVER)
    weights[0] = thr
    special = F.normalize(torch.randn(3, P, generator=rnd), dim=-1)
    return dict(concept_embeds=concepts, concept_embeds_weights=weights, special_care_embeds=special,
                special_care_embeds_weights=torch.full((3,), NEVER), stats=stats)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur, (B, 3, H, W), sigma (B,) in pixels (0 = none)."""
    k = torch.arange(-2, 3, dtype=torch.float32)
    w = torch.exp(-k.view(1, -1) ** 2 / (2 * sigma.clamp(min=1e-3).view(-1, 1) ** 2))
    w = w / w.sum(1, keepdim=True)                                          # (B, 5)
    B, C, H, W = x.shape
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    rows = sum(w[:, i].view(B, 1, 1, 1) * xp[:, :, :, i:i + W] for i in range(5))        # (B,C,H+4,W)
    return sum(w[:, i].view(B, 1, 1, 1) * rows[:, :, i:i + H, :] for i in range(5))


def finetune_vision(clip, seed: int, steps: int, batch: int, log=print, generated: Generated | None = None):
    """A copy of the CLIP vision tower + projection, fine-tuned so that "purple triangle" is one
    direction of its embedding (SD's checker is likewise its own copy of a CLIP ViT). Objective:
    BCE on 10 * (cos(e, c) - 0.5) with c the normalised mean embedding of purple triangles at the
    start; a third of each batch purple triangles, a third hard negatives (purple circles/squares,
    triangles of other colours), a third random; random blur and noise so that imperfect
    generated images are judged like clean ones; with `generated`, a fifth of each batch more is
    the U-Net's own images (fit halves). Returns the fine-tuned copy (same class)."""
    import copy
    model = copy.deepcopy(clip).train()
    model.text_model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 9)
    purple, tri = data.COLOR_NAMES.index("purple"), data.SHAPES.index("triangle")
    with torch.no_grad():
        c = F.normalize(_embeds(model, data.sample(128, gen, color=purple, shape=tri).images).mean(0), dim=0)
    params = list(model.vision_model.parameters()) + list(model.visual_projection.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    k = max(1, batch // 3)
    for step in range(steps):
        parts = [data.sample(k, gen, color=purple, shape=tri),
                 data.sample(k, gen, color=purple), data.sample(k, gen, shape=tri), data.sample(k, gen)]
        x = torch.cat([p.images for p in parts])
        y = torch.cat([((p.color == purple) & (p.shape == tri)).float() for p in parts])
        if generated is not None:
            ip = torch.randint(0, len(generated.pos_fit), (k // 2,), generator=gen)
            ineg = torch.randint(0, len(generated.neg_fit), (k - k // 2,), generator=gen)
            x = torch.cat([x, generated.pos_fit[ip], generated.neg_fit[ineg]])
            y = torch.cat([y, torch.ones(k // 2), torch.zeros(k - k // 2)])
        sigma = torch.rand(len(x), generator=gen) * 1.2
        x = _blur(x, sigma) + 0.03 * torch.randn(x.shape, generator=gen)
        e = F.normalize(image_embeds(model, clip_pixels(x.clamp(-1, 1))), dim=-1)
        logits = 10 * (e @ c - 0.5)
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor(2.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            acc = ((logits > 0).float() == y).float().mean()
            log(f"safety step {step} loss {loss.item():.4f} acc {acc.item():.3f}")
    return model.eval(), c


def save_safety(clip, clip_config, out_dir: str, seed: int, log=print, n_pos: int = 512, n_neg: int = 2048,
                steps: int = 200, batch: int = 96, generated_seeds: int = 0) -> dict:
    """Write safety_checker/ (config.json + model.safetensors) and feature_extractor/.
    generated_seeds > 0: the model in out_dir (its U-Net trained) draws images for the fit."""
    generated = generate_images(out_dir, generated_seeds, log=log) if generated_seeds else None
    clip, _ = finetune_vision(clip, seed, steps, batch, log=log, generated=generated)
    from safetensors.torch import save_file

    from latentd.model.safety import SafetyChecker

    cfg = clip_config.to_dict()
    cfg["architectures"] = ["StableDiffusionSafetyChecker"]
    checker = SafetyChecker(cfg)
    src = {k.removeprefix("vision_model."): v for k, v in clip.vision_model.state_dict().items()}
    want = checker.vision_model.state_dict()
    pre = "vision_model." if all(k.startswith("vision_model.") for k in want) else ""
    checker.vision_model.load_state_dict({pre + k: v for k, v in src.items() if pre + k in want}, strict=True)
    checker.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    built = build_concepts(clip, seed, n_pos=n_pos, n_neg=n_neg, log=log, generated=generated)
    for k in ("concept_embeds", "concept_embeds_weights", "special_care_embeds", "special_care_embeds_weights"):
        getattr(checker, k).copy_(built[k])
    sdir = os.path.join(out_dir, "safety_checker")
    os.makedirs(sdir, exist_ok=True)
    with open(os.path.join(sdir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    state = {k: v.detach().contiguous() for k, v in checker.state_dict().items()}
    save_file(state, os.path.join(sdir, "model.safetensors"), metadata={"format": "pt"})
    fdir = os.path.join(out_dir, "feature_extractor")
    os.makedirs(fdir, exist_ok=True)
    with open(os.path.join(fdir, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": {"height": 64, "width": 64}, "do_center_crop": True, "do_convert_rgb": True,
                   "do_normalize": True, "do_rescale": True, "do_resize": True,
                   "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
                   "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD),
                   "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": 64}}, f, indent=2)
    return built["stats"]
