"""A LoRA adapter for the bundled model (Hu et al. 2021) that teaches it a shape it never saw: a
five-pointed star, "a {colour} star on a {background} background".

Frozen: the VAE, the U-Net and the text encoder. Trained: low-rank pairs (A, B) on every Linear
and Conv2d of the U-Net (LoCon: A a kh x kw conv, B 1x1) and on every Linear of the text encoder
(the word "star" is not a token the encoder was trained on; its byte pieces reach the U-Net only
through what the encoder makes of them). B starts at zero, so step 0 is the base model.

Per step (the base model's objective, training/unet_train.py): half the batch star images with
their captions, half the base model's own shapes and captions (so the adapter does not make it
forget circles, squares and triangles), 10 % of captions dropped to "" (classifier-free guidance
keeps working with the adapter on), Min-SNR-5 weights, bfloat16 autocast. The text encoder runs
with the adapter on the 72 captions and "" once per step. The adapter applies through latentd's
own per-row runtime (model/lora_runtime.py), the same code that serves it.

Resumable: the state file holds the adapter, its EMA, the optimizer, the RNG and the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from latentd.training import data
from latentd.training.adapter_train import AdapterTrainer
from latentd.training.unet_train import T, alphas_cumprod, diffusion_loss, encode_latents


@dataclass(frozen=True)
class LoraTrainConfig:
    steps: int = 1200
    batch: int = 96
    star_fraction: float = 0.5
    lr: float = 2e-3
    warmup: int = 50
    rank_unet: int = 16
    rank_text: int = 8
    ema_decay: float = 0.99
    min_snr_gamma: float = 5.0
    p_uncond: float = 0.1
    bf16: bool = True
    seed: int = 0


class LoraTrainer(AdapterTrainer):
    def __init__(self, model_dir: str, tc: LoraTrainConfig, name: str = "star"):
        super().__init__(model_dir, tc, name, {"unet": tc.rank_unet, "text_encoder": tc.rank_text}, text=True)
        self.caption_ids = self.ids(list(data.ALL_CAPTIONS) + [""])                # (73, 77)
        self.abar = alphas_cumprod()

    def contexts(self) -> torch.Tensor:
        """(73, 77, D): the 72 captions and "" through the text encoder with the adapter on."""
        with self.on(self.caption_ids.shape[0]):
            return self.te(self.caption_ids)[0]

    def loss(self) -> torch.Tensor:
        tc, gen = self.tc, self.gen
        n_star = int(round(tc.batch * tc.star_fraction))
        stars = data.sample(n_star, gen, shape=data.ALL_SHAPES.index(data.STAR))
        base = data.sample(tc.batch - n_star, gen)
        images = torch.cat([stars.images, base.images])
        cap = torch.cat([stars.caption, base.caption])
        z0 = encode_latents(self.vae, images, self.scale, gen, bf16=tc.bf16)        # (B, 4, 16, 16)
        drop = torch.rand(tc.batch, generator=gen) < tc.p_uncond
        idx = torch.where(drop, torch.full_like(cap, len(data.ALL_CAPTIONS)), cap)
        t = torch.randint(0, T, (tc.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        ctx = self.contexts()[idx]
        with self.on(tc.batch):
            return diffusion_loss(self.unet, z0, t, ctx, noise, self.abar, tc.min_snr_gamma, tc.bf16)
