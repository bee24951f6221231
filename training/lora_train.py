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

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from latentd.model import lora_runtime
from latentd.model.lora_runtime import LoraAdapter, LoraLayer, RowMix
from latentd.training import data
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


def new_adapter(name: str, unet: nn.Module, text_encoder: nn.Module, tc: LoraTrainConfig) -> LoraAdapter:
    """Fresh pairs on every adaptable layer: A ~ N(0, 1/fan_in), B = 0 (Hu et al. 2021, §4.1)."""
    g = torch.Generator().manual_seed(tc.seed + 7)
    layers = {}
    for comp, root, rank in (("unet", unet, tc.rank_unet), ("text_encoder", text_encoder, tc.rank_text)):
        for key, shape in lora_runtime.layer_shapes(root, comp).items():
            out_f, in_f = shape[0], shape[1]
            r = min(rank, out_f, in_f)
            k = shape[2:]
            fan_in = in_f * math.prod(k)
            down = nn.Parameter(torch.randn((r, in_f, *k), generator=g) / math.sqrt(fan_in))
            up = nn.Parameter(torch.zeros((out_f, r, *([1] * len(k)))))
            layers[key] = LoraLayer(down, up, 1.0)
    return LoraAdapter(name, layers, "sd")


def lr_at(step: int, tc: LoraTrainConfig) -> float:
    s = min(step, tc.steps)
    return tc.lr * min(1.0, (step + 1) / tc.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / tc.steps)))


class LoraTrainer:
    def __init__(self, model_dir: str, tc: LoraTrainConfig, name: str = "star"):
        from latentd.model.loader import load_text_encoder, load_tokenizer, load_unet, load_vae
        torch.manual_seed(tc.seed)
        self.tc = tc
        self.vae, vcfg = load_vae(os.path.join(model_dir, "vae"))
        self.scale = vcfg.scaling_factor
        self.unet, _ = load_unet(os.path.join(model_dir, "unet"))
        self.te = load_text_encoder(os.path.join(model_dir, "text_encoder"))
        for m in (self.vae, self.unet, self.te):
            m.eval().requires_grad_(False)
        tok = load_tokenizer(os.path.join(model_dir, "tokenizer"))
        self.ids = tok(list(data.ALL_CAPTIONS) + [""], padding="max_length", max_length=tok.model_max_length,
                       truncation=True, return_tensors="pt")["input_ids"]       # (73, 77)
        lora_runtime.attach(self.unet, "unet")
        lora_runtime.attach(self.te, "text_encoder")
        self.adapter = new_adapter(name, self.unet, self.te, tc)
        self.params = [p for layer in self.adapter.layers.values() for p in (layer.down, layer.up)]
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=0.0, betas=(0.9, 0.99))
        self.abar = alphas_cumprod()
        self.gen = torch.Generator().manual_seed(tc.seed + 11)
        self.step_no = 0
        self.avg: float | None = None

    def contexts(self) -> torch.Tensor:
        """(73, 77, D): the 72 captions and "" through the text encoder with the adapter on."""
        with lora_runtime.active(RowMix([((self.adapter, 1.0),)] * self.ids.shape[0])):
            return self.te(self.ids)[0]

    def step(self) -> float:
        tc, gen = self.tc, self.gen
        n_star = int(round(tc.batch * tc.star_fraction))
        stars, base = data.sample(n_star, gen, shape=data.ALL_SHAPES.index(data.STAR)), data.sample(tc.batch - n_star, gen)
        images = torch.cat([stars.images, base.images])
        cap = torch.cat([stars.caption, base.caption])
        z0 = encode_latents(self.vae, images, self.scale, gen, bf16=tc.bf16)        # (B, 4, 16, 16)
        drop = torch.rand(tc.batch, generator=gen) < tc.p_uncond
        idx = torch.where(drop, torch.full_like(cap, len(data.ALL_CAPTIONS)), cap)
        t = torch.randint(0, T, (tc.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step_no, tc)
        ctx = self.contexts()[idx]
        with lora_runtime.active(RowMix([((self.adapter, 1.0),)] * tc.batch)):
            loss = diffusion_loss(self.unet, z0, t, ctx, noise, self.abar, tc.min_snr_gamma, tc.bf16)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        d = min(tc.ema_decay, (1 + self.step_no) / (10 + self.step_no))
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.lerp_(p, 1 - d)
        v = float(loss.detach())
        self.avg = v if self.avg is None else 0.98 * self.avg + 0.02 * v
        self.step_no += 1
        return v

    @property
    def done(self) -> bool:
        return self.step_no >= self.tc.steps

    def ema_adapter(self) -> LoraAdapter:
        it = iter(self.ema)
        layers = {k: LoraLayer(next(it).clone(), next(it).clone(), 1.0) for k in self.adapter.layers}
        return LoraAdapter(self.adapter.name, layers, "sd")

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        torch.save({"params": [p.detach() for p in self.params], "ema": self.ema, "opt": self.opt.state_dict(),
                    "gen": self.gen.get_state(), "step": self.step_no,
                    "avg": float("nan") if self.avg is None else self.avg}, tmp)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        s = torch.load(path, weights_only=True)
        with torch.no_grad():
            for p, v in zip(self.params, s["params"]):
                p.copy_(v)
            for e, v in zip(self.ema, s["ema"]):
                e.copy_(v)
        self.opt.load_state_dict(s["opt"])
        self.gen.set_state(s["gen"])
        self.step_no = int(s["step"])
        self.avg = None if math.isnan(float(s["avg"])) else float(s["avg"])


def train(model_dir: str, out_file: str, state_path: str, tc: LoraTrainConfig, log=print,
          minutes_budget: float | None = None, checkpoint_every: int = 100) -> LoraTrainer:
    """Train (or resume) until done or the budget; writes the EMA adapter to out_file at every
    checkpoint (diffusers/PEFT layout, model/lora_format.py)."""
    from latentd.model.lora_format import save_peft
    deadline = None if minutes_budget is None else time.time() + 60 * minutes_budget
    tr = LoraTrainer(model_dir, tc)
    os.makedirs(os.path.dirname(os.path.abspath(state_path)), exist_ok=True)
    if os.path.exists(state_path):
        tr.load(state_path)
        log(f"lora: resumed at step {tr.step_no} from {state_path}")
    meta = {"base_model": "shapes", "trigger": "a {color} star on a {background} background", "train": asdict(tc)}
    t_mark, s_mark = time.time(), tr.step_no
    while not tr.done:
        loss = tr.step()
        s = tr.step_no
        if s % 25 == 0 or tr.done:
            sps = (s - s_mark) * tc.batch / max(1e-9, time.time() - t_mark)
            log(f"lora step {s}/{tc.steps} loss {loss:.4f} avg {tr.avg:.4f} lr {lr_at(s, tc):.2e} "
                f"{sps:.0f} samples/s load {os.getloadavg()[0]:.2f}")
            t_mark, s_mark = time.time(), s
        last = tr.done or (deadline is not None and time.time() > deadline)
        if s % checkpoint_every == 0 or last:
            tr.save(state_path)
            save_peft(tr.ema_adapter(), out_file, {**meta, "step": s})
        if last and not tr.done:
            log(f"lora: time budget reached at step {s}; run again with the same --state to continue")
            break
    return tr
