"""KL autoencoder for the shapes model (Rombach et al. 2022, §3.1), trained with OUR
model.vae.AutoencoderKL. 4x downsampling: (B, 3, 64, 64) -> (B, 4, 16, 16) latents, because at
64x64 an 8x autoencoder (8x8 latents) rounds squares' corners (measured: 79% of squares keep sharp corners).

The network is fully convolutional (no mid-block attention), so it trains on random 32x32 crops
(4x cheaper per image on this CPU) and runs on 64x64 images unchanged.

Loss per image: edge-weighted L1 + MSE on pixels (weight 1 + EDGE_W on pixels next to an edge of
the target, so corners stay sharp) + a small KL(q(z|x) || N(0, I)) (Kingma & Welling 2014).
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

from latentd.model.config import VAEConfig
from latentd.training import data
from latentd.model.vae import AutoencoderKL

EDGE_W = 4.0
KL_W = 1e-5


def make_config(channels=(16, 32, 64), groups: int = 8) -> VAEConfig:
    return VAEConfig(block_out_channels=tuple(channels), layers_per_block=1, latent_channels=4,
                     norm_num_groups=groups, sample_size=64, scaling_factor=1.0,
                     mid_block_add_attention=False, force_upcast=False)


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) in {0, 1}: pixels within 1 px of a colour edge."""
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True)
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True)
    g = F.pad(gx, (0, 1, 0, 0)) + F.pad(gy, (0, 0, 0, 1))
    return (F.max_pool2d(g, 3, 1, 1) > 0.05).float()


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, gen: torch.Generator):
    rec, mean, logvar = vae(x, generator=gen)                          # (B,3,64,64), (B,4,16,16) x2
    rec, mean, logvar = rec.float(), mean.float(), logvar.float()
    w = 1 + EDGE_W * edge_map(x)
    l1 = ((rec - x).abs() * w).mean() / w.mean()
    mse = F.mse_loss(rec, x)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return l1 + mse + KL_W * kl, dict(l1=l1.item(), mse=mse.item(), kl=kl.item())


def random_crop(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, 64, 64) -> (B, 3, size, size), offsets multiples of 4 (the latent grid)."""
    if size >= x.shape[-1]:
        return x
    n = (x.shape[-1] - size) // 4 + 1
    oy, ox = torch.randint(0, n, (2, x.shape[0]), generator=gen) * 4
    return torch.stack([x[i, :, oy[i]:oy[i] + size, ox[i]:ox[i] + size] for i in range(x.shape[0])])


def _lr(step: int, steps: int, lr: float) -> float:
    """Linear warmup over 5% of the steps, then cosine to 5% of lr (pure function: resumable)."""
    warm = max(1, steps // 20)
    return lr * min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def train_vae(steps: int, batch: int, seed: int, log=print, lr: float = 2e-3, cfg: VAEConfig | None = None,
              deadline: float | None = None, crop: int = 32, bf16: bool = True,
              state_path: str | None = None, checkpoint_every: int = 500) -> tuple[AutoencoderKL, bool]:
    """Train the autoencoder; returns (vae, finished). With state_path the run is resumable: the
    state (weights, optimizer, RNGs, step) is saved every checkpoint_every steps and at a deadline,
    and a later call with the same arguments continues from it."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(cfg or make_config()).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed + 2)
    ngen = torch.Generator().manual_seed(seed + 3)
    start = 0
    if state_path and os.path.exists(state_path):
        st = torch.load(state_path, weights_only=True)
        vae.load_state_dict(st["vae"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        ngen.set_state(st["ngen"])
        start = int(st["step"])
        log(f"vae: resumed at step {start}")

    def save(step):
        if state_path:
            torch.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                        "ngen": ngen.get_state(), "step": step}, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)

    t0, s0 = time.time(), start
    for step in range(start, steps):
        x = random_crop(data.sample(batch, gen).images, crop, gen)      # (B, 3, crop, crop)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, parts = vae_loss(vae, x, ngen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            ips = (step + 1 - s0) * batch / max(1e-9, time.time() - t0)
            log(f"vae step {step}/{steps} loss {loss.item():.4f} l1 {parts['l1']:.4f} mse {parts['mse']:.5f} "
                f"kl {parts['kl']:.2f} {ips:.0f} crops/s load {os.getloadavg()[0]:.2f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            save(step + 1)
        if deadline is not None and time.time() > deadline and step + 1 < steps:
            save(step + 1)
            log(f"vae: time budget reached at step {step + 1}; `--resume` continues from here")
            return vae.eval(), False
    return vae.eval(), True


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, n: int = 512, seed: int = 4321) -> float:
    """scaling_factor = 1 / std(z) so the diffusion runs on unit-variance latents (Rombach et al.
    2022, §4.3.2 / App. G: SD's 0.18215 was found the same way)."""
    x = data.sample(n, torch.Generator().manual_seed(seed)).images
    mean, _ = vae.encode(x)
    return float(1.0 / mean.std())
