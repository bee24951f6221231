"""Judging the shapes model with the procedural checker (training/shape_checker.py): shared
by the training recipe (a small subset logged while it trains) and bench/eval_shapes.py (all
captions). Accuracy per attribute and "all three right", per shape, and the safety flag rates on
"purple triangle" captions against the rest."""
from __future__ import annotations

import time

import numpy as np
import torch

from latentd.training import data
from latentd.training.shape_checker import classify

ATTRS = ("color", "shape", "background", "all")


def star_captions() -> list[tuple[int, int, int]]:
    """(color, star, background) indices of the 18 star captions."""
    star = data.ALL_SHAPES.index(data.STAR)
    return [(c, star, b) for c in range(len(data.COLOR_NAMES)) for b in range(len(data.BG_NAMES))]


def caption_list(subset: int | None = None) -> list[tuple[int, int, int]]:
    """(color, shape, background) indices; a subset (<= 18) spreads over all colours, shapes and
    backgrounds."""
    allc = [(c, s, b) for c in range(len(data.COLOR_NAMES)) for s in range(len(data.SHAPES))
            for b in range(len(data.BG_NAMES))]
    if not subset or subset >= len(allc):
        return allc
    return [(i % 6, i % 3, (i // 3) % 3) for i in range(min(subset, 18))]


def judge(images, truth: list[tuple[int, int, int]]) -> dict:
    """Checker accuracy of PIL images against (color, shape, background) indices."""
    ok = {k: [] for k in ATTRS}
    by_shape = {s: [] for s in data.ALL_SHAPES}
    for im, (c, s, b) in zip(images, truth):
        v = classify(im).correct(data.COLOR_NAMES[c], data.ALL_SHAPES[s], data.BG_NAMES[b])
        for k in ATTRS:
            ok[k].append(v[k])
        by_shape[data.ALL_SHAPES[s]].append(v["shape"])
    r = {k: float(np.mean(v)) for k, v in ok.items()}
    r["shape_by_class"] = {s: float(np.mean(v)) if v else None for s, v in by_shape.items()}
    r["n"] = len(truth)
    return r


def generate(pipe, caps, seeds: int, guidance: float, steps: int, sampler: str, batch: int = 18,
             seed0: int = 1000, **request):
    """Images of every caption in caps x seeds (seed0 + k) through the engine (`request`: more
    GenerationRequest fields, e.g. loras); returns (images, truth, prompts, seconds per image)."""
    from latentd.model.pipeline import GenerationRequest
    reqs, truth = [], []
    for k in range(seeds):
        for c, s, b in caps:
            reqs.append(GenerationRequest(prompt=data.caption(data.COLOR_NAMES[c], data.ALL_SHAPES[s], data.BG_NAMES[b]),
                                          steps=steps, guidance_scale=guidance, sampler=sampler, seed=seed0 + k,
                                          **request))
            truth.append((c, s, b))
    images, t0 = [], time.perf_counter()
    for i in range(0, len(reqs), batch):
        images += [g.image for g in pipe.generate(reqs[i:i + batch])]
    return images, truth, [r.prompt for r in reqs], (time.perf_counter() - t0) / max(1, len(reqs))


def flag_rates(checker, images, truth) -> dict:
    """Safety checker flag rate on purple triangles and on every other caption."""
    flags = checker.flags(images)
    purple, tri = data.COLOR_NAMES.index("purple"), data.SHAPES.index("triangle")
    is_pt = [c == purple and s == tri for c, s, _ in truth]
    pt = [f for f, p in zip(flags, is_pt) if p]
    other = [f for f, p in zip(flags, is_pt) if not p]
    return {"flag_rate_purple_triangle": float(np.mean(pt)) if pt else None,
            "flag_rate_other": float(np.mean(other)) if other else None}


@torch.no_grad()
def vae_fidelity(vae, n: int, seed: int = 99) -> dict:
    """Checker accuracy on n VAE reconstructions (mean latent) of fresh images, and on the
    originals as the checker's ceiling."""
    b = data.sample(n, torch.Generator().manual_seed(seed))
    mean, _ = vae.encode(b.images)
    rec = vae.decode(mean).clamp(-1, 1)
    truth = list(zip(b.color.tolist(), b.shape.tolist(), b.background.tolist()))
    return {"n": n, "mse": float(((rec - b.images) ** 2).mean()),
            "original": judge(data.to_pil(b.images), truth),
            "reconstruction": judge(data.to_pil(rec), truth)}


def fmt(r: dict) -> str:
    by = " ".join(f"{k} {v:.0%}" for k, v in r["shape_by_class"].items() if v is not None)
    return (f"colour {r['color']:.1%} background {r['background']:.1%} shape {r['shape']:.1%} "
            f"all {r['all']:.1%} ({by})")
