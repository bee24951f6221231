"""Denoising U-Net of the shapes model, trained with OUR model.unet.UNet on 16x16x4 latents of the
frozen VAE, conditioned by cross-attention on the frozen CLIP text tower (Rombach et al. 2022).

Per step (Ho et al. 2020, Algorithm 1 / Eq. 14):
  x0 ~ data, z0 = E(x0) * scale                      (B, 4, 16, 16)
  t ~ U{0..999}, eps ~ N(0, I)
  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps        (forward closed form, §2)
  loss = || eps - eps_theta(z_t, t, c) ||^2
with c the text tower's last hidden state (B, 77, D) of the caption, replaced by that of the empty
caption "" for 10% of the samples (caption dropout for classifier-free guidance, Ho & Salimans
2022). AdamW, linear warmup + cosine decay, EMA of the weights for sampling.
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.config import UNetConfig
from model.training import data
from model.unet import UNet

# Stable Diffusion's noise schedule ("scaled_linear", 1000 steps).
BETA_START, BETA_END, T = 0.00085, 0.012, 1000
P_UNCOND = 0.1


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()                              # (1000,)


def make_config(cross_dim: int, channels=(32, 64, 128), heads=(2, 4, 4), groups: int = 16) -> UNetConfig:
    return UNetConfig(block_out_channels=tuple(channels), down_attention=(False, True, True),
                      num_heads=tuple(heads), layers_per_block=1, transformer_layers=1, in_channels=4,
                      out_channels=4, cross_attention_dim=cross_dim, norm_num_groups=groups,
                      sample_size=16)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, 64, 64) -> z0 = sample of q(z|x) times scale: (B, 4, 16, 16)."""
    mean, logvar = vae.encode(images)
    return (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)) * scale


def diffusion_loss(unet, z0, t, context, noise, abar) -> torch.Tensor:
    a = abar[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise                             # (B, 4, 16, 16)
    return F.mse_loss(unet(zt, t, context), noise)


class EMA:
    def __init__(self, model, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.n = 0

    @torch.no_grad()
    def update(self, model):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)


def train_unet(vae, scale: float, contexts: torch.Tensor, cfg: UNetConfig, steps: int, batch: int, seed: int,
               log=print, lr: float = 1e-3, ema_decay: float = 0.995, deadline: float | None = None,
               checkpoint=None, checkpoint_every: int = 0, init=None):
    """contexts: (55, 77, D) text-tower states of the 54 captions, then of "" (unconditional).
    Returns (unet, ema_unet, history) where history is [(step, loss), ...]."""
    torch.manual_seed(seed)
    unet = UNet(cfg).train()
    if init is not None:          # continue from given weights (recipe stage "unet_more")
        unet.load_state_dict(init.state_dict(), strict=True)
    ema = EMA(unet, ema_decay)
    abar = alphas_cumprod()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warm = max(1, min(100, steps // 10)) if init is None else max(1, steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    gen = torch.Generator().manual_seed(seed + 4)
    uncond = contexts.shape[0] - 1
    hist, run, t0 = [], None, time.time()
    bar = tqdm(range(steps), desc="unet", mininterval=5)
    for step in bar:
        b = data.sample(batch, gen)
        z0 = encode_latents(vae, b.images, scale, gen)                      # (B, 4, 16, 16)
        drop = torch.rand(batch, generator=gen) < P_UNCOND
        idx = torch.where(drop, torch.full_like(b.caption, uncond), b.caption)
        t = torch.randint(0, T, (batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        loss = diffusion_loss(unet, z0, t, contexts[idx], noise, abar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(unet)
        run = loss.item() if run is None else 0.95 * run + 0.05 * loss.item()
        if step % 10 == 0 or step == steps - 1:
            hist.append((step, run))
            bar.set_postfix(loss=f"{run:.4f}")
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step} loss {loss.item():.4f} avg {run:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"t {time.time() - t0:.0f}s")
        if checkpoint is not None and checkpoint_every and step and step % checkpoint_every == 0:
            checkpoint(ema.model, step)
        if deadline is not None and time.time() > deadline:
            log(f"unet: time budget reached at step {step}")
            break
    return unet.eval(), ema.model, hist
