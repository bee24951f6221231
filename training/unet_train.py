"""Denoising U-Net of the shapes model, trained with OUR model.unet.UNet on 16x16x4 latents of the
frozen VAE, conditioned by cross-attention on the frozen CLIP text tower (Rombach et al. 2022).

Per step (Ho et al. 2020, Algorithm 1 / Eq. 14):
  x0 ~ data, z0 = E(x0) * scale                      (B, 4, 16, 16)
  t ~ U{0..999}, eps ~ N(0, I)
  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps        (forward closed form, §2)
  loss = w(t) || eps - eps_theta(z_t, t, c) ||^2
with c the text tower's last hidden state (B, 77, D) of the caption, replaced by that of the empty
caption "" for 10% of the samples (caption dropout for classifier-free guidance, Ho & Salimans
2022), and w(t) = min(SNR(t), gamma) / SNR(t) the Min-SNR-gamma weighting for eps-prediction
(Hang et al. 2023, Eq. 7 with SNR = abar / (1 - abar)), which stops the many easy low-noise
steps from dominating the gradient. AdamW, linear warmup + cosine decay, bfloat16 autocast
(about 1.3x faster than float32 for this model on an avx512_bf16 CPU), EMA of the weights.

Resumable: `Trainer.save(path)` writes every piece of state (weights, EMA, optimizer, RNG, step);
a fresh Trainer on the same config continues bit-for-bit where it stopped.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass

import torch

from latentd.model.config import UNetConfig
from latentd.training import data
from latentd.model.unet import UNet

# Stable Diffusion's noise schedule ("scaled_linear", 1000 steps).
BETA_START, BETA_END, T = 0.00085, 0.012, 1000


@dataclass(frozen=True)
class UNetTrainConfig:
    steps: int = 4000
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 200
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0      # 0 = plain (unweighted) eps loss
    p_uncond: float = 0.1
    bf16: bool = True
    seed: int = 0


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()                              # (1000,)


def make_config(cross_dim: int, channels=(32, 64, 128), heads=(2, 4, 4), groups: int = 16) -> UNetConfig:
    return UNetConfig(block_out_channels=tuple(channels), down_attention=(False, True, True),
                      num_heads=tuple(heads), layers_per_block=1, transformer_layers=1, in_channels=4,
                      out_channels=4, cross_attention_dim=cross_dim, norm_num_groups=groups,
                      sample_size=16)


def warmup_cosine(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine from lr to 5% of lr over `steps` (a pure function of the step,
    so a resumed run follows the same schedule)."""
    s = min(step, steps)
    return lr * min(1.0, (step + 1) / max(1, warmup)) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps)))


def lr_at(step: int, tc: UNetTrainConfig) -> float:
    return warmup_cosine(step, tc.steps, tc.lr, tc.warmup)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, scale: float, gen: torch.Generator, bf16: bool = False) -> torch.Tensor:
    """(B, 3, 64, 64) -> z0 = sample of q(z|x) times scale: (B, 4, 16, 16) float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        mean, logvar = vae.encode(images)
    mean, logvar = mean.float(), logvar.float()
    return (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)) * scale


def min_snr_weight(abar_t: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) Min-SNR-gamma loss weight for eps-prediction: min(SNR, gamma) / SNR (Hang et al. 2023)."""
    if gamma <= 0:
        return torch.ones_like(abar_t)
    snr = abar_t / (1 - abar_t)
    return snr.clamp(max=gamma) / snr


def diffusion_loss(unet, z0, t, context, noise, abar, gamma: float = 0.0, bf16: bool = False) -> torch.Tensor:
    a = abar[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise                             # (B, 4, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pred = unet(zt, t, context)
    per = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))                 # (B,)
    return (min_snr_weight(abar[t], gamma) * per).mean()


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


class Trainer:
    """One U-Net training run: step() trains on one batch; save()/load() make it resumable.
    contexts: (55, 77, D) text-tower states of the 54 captions, then of "" (unconditional)."""

    def __init__(self, vae, scale: float, contexts: torch.Tensor, cfg: UNetConfig, tc: UNetTrainConfig,
                 init: torch.nn.Module | None = None):
        torch.manual_seed(tc.seed)
        self.vae, self.scale, self.contexts, self.cfg, self.tc = vae, scale, contexts, cfg, tc
        self.unet = UNet(cfg).train()
        if init is not None:
            self.unet.load_state_dict(init.state_dict(), strict=True)
        self.ema = EMA(self.unet, tc.ema_decay)
        self.abar = alphas_cumprod()
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=tc.lr, weight_decay=0.01, betas=(0.9, 0.99))
        self.gen = torch.Generator().manual_seed(tc.seed + 4)
        self.step_no = 0
        self.avg: float | None = None
        self.history: list[tuple[int, float]] = []      # (step, running loss)
        self.samples_per_s: list[tuple[int, float]] = []

    def step(self) -> float:
        tc, gen = self.tc, self.gen
        b = data.sample(tc.batch, gen)
        z0 = encode_latents(self.vae, b.images, self.scale, gen, bf16=tc.bf16)       # (B, 4, 16, 16)
        uncond = self.contexts.shape[0] - 1
        drop = torch.rand(tc.batch, generator=gen) < tc.p_uncond
        idx = torch.where(drop, torch.full_like(b.caption, uncond), b.caption)
        t = torch.randint(0, T, (tc.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step_no, tc)
        loss = diffusion_loss(self.unet, z0, t, self.contexts[idx], noise, self.abar, tc.min_snr_gamma, tc.bf16)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.ema.update(self.unet)
        v = loss.item()
        self.avg = v if self.avg is None else 0.98 * self.avg + 0.02 * v
        if self.step_no % 10 == 0:
            self.history.append((self.step_no, self.avg))
        self.step_no += 1
        return v

    @property
    def done(self) -> bool:
        return self.step_no >= self.tc.steps

    def save(self, path: str) -> None:
        """Training state (our own file, read back with weights_only=True: no arbitrary unpickling)."""
        tmp = path + ".tmp"
        torch.save({"unet": self.unet.state_dict(), "ema": self.ema.model.state_dict(), "ema_n": self.ema.n,
                    "opt": self.opt.state_dict(), "gen": self.gen.get_state(), "step": self.step_no,
                    "avg": self.avg if self.avg is not None else float("nan"),
                    "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 2),
                    "sps": torch.tensor(self.samples_per_s, dtype=torch.float64).reshape(-1, 2)}, tmp)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        s = torch.load(path, weights_only=True)
        self.unet.load_state_dict(s["unet"])
        self.ema.model.load_state_dict(s["ema"])
        self.ema.n = int(s["ema_n"])
        self.opt.load_state_dict(s["opt"])
        self.gen.set_state(s["gen"])
        self.step_no = int(s["step"])
        self.avg = None if math.isnan(float(s["avg"])) else float(s["avg"])
        self.history = [(int(a), float(b)) for a, b in s["history"].tolist()]
        self.samples_per_s = [(int(a), float(b)) for a, b in s["sps"].tolist()]


def run(trainer: Trainer, state_path: str, log=print, deadline: float | None = None, checkpoint=None,
        checkpoint_every: int = 200, evaluate=None, eval_every: int = 0) -> None:
    """Train until trainer.done or the deadline, saving the resumable state (and calling
    checkpoint(ema_unet, step)) every checkpoint_every steps and at the end; evaluate(ema_unet, step)
    every eval_every steps. Logs loss, lr and samples/s (so contention shows in the log)."""
    if os.path.exists(state_path):
        trainer.load(state_path)
        log(f"unet: resumed at step {trainer.step_no} from {state_path}")
    tc = trainer.tc
    t_mark, s_mark = time.time(), trainer.step_no
    while not trainer.done:
        loss = trainer.step()
        s = trainer.step_no
        if s % 50 == 0 or trainer.done:
            sps = (s - s_mark) * tc.batch / max(1e-9, time.time() - t_mark)
            trainer.samples_per_s.append((s, sps))
            log(f"unet step {s}/{tc.steps} loss {loss:.4f} avg {trainer.avg:.4f} lr {lr_at(s, tc):.2e} "
                f"{sps:.0f} samples/s seen {s * tc.batch} load {os.getloadavg()[0]:.2f}")
            t_mark, s_mark = time.time(), s
        last = trainer.done or (deadline is not None and time.time() > deadline)
        if (checkpoint_every and s % checkpoint_every == 0) or last:
            trainer.save(state_path)
            if checkpoint is not None:
                checkpoint(trainer.ema.model, s)
        if evaluate is not None and ((eval_every and s % eval_every == 0) or trainer.done):
            evaluate(trainer.ema.model, s)
            t_mark, s_mark = time.time(), s
        if last and not trainer.done:
            log(f"unet: time budget reached at step {s}; `--resume` continues from here")
            break
