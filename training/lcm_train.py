"""A few-step adapter for the bundled model: latent consistency distillation into a LoRA (LCM-LoRA,
Luo et al. 2023, "Latent Consistency Models", Algorithm 1, and "LCM-LoRA"), served with the `lcm`
sampler at guidance 1 (no unconditional rows).

Teacher: the frozen bundled U-Net with classifier-free guidance (Ho & Salimans 2022) at a random
scale w in [W_MIN, W_MAX] (the guidance is distilled in, so the student runs at guidance 1).
Student: the same U-Net plus the adapter (model/lora_runtime.py; the teacher is the same modules
with no adapter active). Per sample, on the skipping grid t_n = n k - 1 (k = T / 50,
model/consistency.py):

  z0 = E(x) scale,  t uniform on the grid,  s = max(t - k, 0),  x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
  teacher, one DDIM step t -> s with the guided prediction (eq. 9, the augmented PF-ODE solver):
      e_w = e_u + w (e_c - e_u),  x0_w = (x_t - sqrt(1 - abar_t) e_w) / sqrt(abar_t)
      x_s = sqrt(abar_s) x0_w + sqrt(1 - abar_s) e_w
  consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t)       (eq. 5, model/consistency.py)
  loss = Huber_c( f_student(x_t, t) - stopgrad f_student(x_s, s) ),  c = 0.001     (LCM-LoRA's code)

The target uses the online student without gradient (LCM-LoRA drops the EMA target network);
the shipped weights are an EMA of the adapter. bfloat16 autocast; resumable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from latentd.model.consistency import ORIGINAL_STEPS, boundary_scalings, origin_timesteps
from latentd.training import data
from latentd.training.adapter_train import AdapterTrainer
from latentd.training.unet_train import T, alphas_cumprod, encode_latents

W_MIN, W_MAX = 4.0, 6.0       # teacher guidance (the bundled model's default is 5)
HUBER_C = 0.001


@dataclass(frozen=True)
class LcmTrainConfig:
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    rank: int = 16
    ema_decay: float = 0.995
    bf16: bool = True
    seed: int = 0


class LcmTrainer(AdapterTrainer):
    def __init__(self, model_dir: str, tc: LcmTrainConfig, name: str = "lcm"):
        super().__init__(model_dir, tc, name, {"unet": tc.rank}, text=False)
        with torch.no_grad():
            self.contexts = self.te(self.ids(list(data.CAPTIONS) + [""]))[0]      # (55, 77, D)
        self.abar = alphas_cumprod()                                               # (1000,)
        self.grid = torch.from_numpy(origin_timesteps(T, ORIGINAL_STEPS))          # (50,) ascending
        self.k = T // ORIGINAL_STEPS

    def _unet(self, z, t, ctx, student: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.tc.bf16):
            if student:
                with self.on(z.shape[0]):
                    return self.unet(z, t, ctx).float()
            return self.unet(z, t, ctx).float()

    def _f(self, z, t, eps) -> torch.Tensor:
        """The consistency function from an eps prediction at (z, t): c_skip z + c_out x0."""
        a = self.abar[t].view(-1, 1, 1, 1)
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        c_skip, c_out = boundary_scalings(t.float())
        return c_skip.view(-1, 1, 1, 1) * z + c_out.view(-1, 1, 1, 1) * x0

    def loss(self) -> torch.Tensor:
        tc, gen = self.tc, self.gen
        b = data.sample(tc.batch, gen)
        z0 = encode_latents(self.vae, b.images, self.scale, gen, bf16=tc.bf16)      # (B, 4, 16, 16)
        n = torch.randint(0, len(self.grid), (tc.batch,), generator=gen)
        t = self.grid[n]                                                           # (B,)
        s = (t - self.k).clamp(min=0)
        noise = torch.randn(z0.shape, generator=gen)
        w = (W_MIN + (W_MAX - W_MIN) * torch.rand(tc.batch, generator=gen)).view(-1, 1, 1, 1)
        a_t, a_s = self.abar[t].view(-1, 1, 1, 1), self.abar[s].view(-1, 1, 1, 1)
        x_t = a_t.sqrt() * z0 + (1 - a_t).sqrt() * noise
        ctx = self.contexts[b.caption]
        uncond = self.contexts[-1:].expand_as(ctx)
        with torch.no_grad():
            e = self._unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([ctx, uncond]), student=False)
            e_c, e_u = e.chunk(2)
            e_w = e_u + w * (e_c - e_u)
            x0_w = (x_t - (1 - a_t).sqrt() * e_w) / a_t.sqrt()
            x_s = a_s.sqrt() * x0_w + (1 - a_s).sqrt() * e_w                      # DDIM step t -> s
            target = self._f(x_s, s, self._unet(x_s, s, ctx, student=True))
        pred = self._f(x_t, t, self._unet(x_t, t, ctx, student=True))
        return (((pred - target) ** 2 + HUBER_C ** 2).sqrt() - HUBER_C).mean()
