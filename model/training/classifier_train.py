"""Noise-aware classifier of the shapes model (model/classifier.py), trained on the frozen VAE's
latents noised to every timestep, as Dhariwal & Nichol 2021 (§4, App. D) train theirs:

  x ~ data, z0 = E(x) * scale,  t ~ U{0..999},  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps,
  loss = sum over heads (color, shape, background) of CE(p_phi(. | z_t, t), y_head).

At large t the latent carries almost no information, so accuracy falls to chance there; the
accuracy against t is measured and written beside the weights (and into the model card).
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

from model.classifier import ClassifierConfig, LatentClassifier
from model.training import data
from model.training.unet_train import T, alphas_cumprod, encode_latents

HEADS = {"color": data.COLOR_NAMES, "shape": data.SHAPES, "background": data.BG_NAMES}


def make_config() -> ClassifierConfig:
    return ClassifierConfig(heads={k: tuple(v) for k, v in HEADS.items()})


def _targets(b: data.Batch) -> dict[str, torch.Tensor]:
    return {"color": b.color, "shape": b.shape, "background": b.background}


def train_classifier(vae, scale: float, steps: int, batch: int, seed: int, log=print, lr: float = 2e-3,
                     bf16: bool = True, reuse: int = 4) -> LatentClassifier:
    """batch latents per step, from batch // reuse fresh images each noised to `reuse` timesteps
    (the VAE encoder costs more than the classifier; one image at several noise levels is still
    a fair sample of (z_t, t))."""
    torch.manual_seed(seed)
    clf = LatentClassifier(make_config()).train()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.01)
    abar = alphas_cumprod()
    gen = torch.Generator().manual_seed(seed + 11)
    warm = max(1, steps // 20)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        b = data.sample(max(1, batch // reuse), gen)
        z0 = encode_latents(vae, b.images, scale, gen, bf16=bf16).repeat(reuse, 1, 1, 1)   # (B, 4, 16, 16)
        t = torch.randint(0, T, (z0.shape[0],), generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = clf(zt, t)
        ys = {h: y.repeat(reuse) for h, y in _targets(b).items()}
        loss = sum(F.cross_entropy(logits[h].float(), ys[h]) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps} loss {loss.item():.4f} t {time.time() - t0:.0f}s "
                f"load {os.getloadavg()[0]:.2f}")
    return clf.eval().requires_grad_(False)


@torch.no_grad()
def accuracy_by_t(clf, vae, scale: float, n: int = 512, seed: int = 77,
                  ts=(0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)) -> dict:
    """Accuracy of each head on n fresh images noised to each t (the same images at every t)."""
    gen = torch.Generator().manual_seed(seed)
    b = data.sample(n, gen)
    z0 = encode_latents(vae, b.images, scale, gen)
    noise = torch.randn(z0.shape, generator=gen)
    abar = alphas_cumprod()
    ys = _targets(b)
    out = {}
    for t in ts:
        a = abar[t]
        logits = clf(a.sqrt() * z0 + (1 - a).sqrt() * noise, torch.full((n,), t))
        out[str(t)] = {h: float((logits[h].argmax(-1) == ys[h]).float().mean()) for h in HEADS}
    return out
