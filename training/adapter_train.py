"""What every adapter recipe of the bundled model shares (training/lora_train.py: the star;
training/lcm_train.py: few-step consistency distillation): the frozen model, fresh LoRA pairs
(Hu et al. 2021: A ~ N(0, 1/fan_in), B = 0, so step 0 is the base model), AdamW with warmup and
cosine decay, an EMA of the adapter (what ships), a resumable state file, and the loop that logs
samples/s with the load average and writes the adapter at every checkpoint.

The adapter applies through latentd's own per-row runtime (model/lora_runtime.py), the code that
serves it; the base model with no mix active is the frozen teacher where a recipe needs one.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict

import torch
from torch import nn

from latentd.model import lora_runtime
from latentd.model.lora_runtime import LoraAdapter, LoraLayer, RowMix
from latentd.training.unet_train import warmup_cosine


def new_adapter(name: str, parts: dict[str, tuple[nn.Module, int]], seed: int) -> LoraAdapter:
    """Fresh pairs on every Linear/Conv2d of each part ({component: (module, rank)})."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for comp, (root, rank) in parts.items():
        for key, shape in lora_runtime.layer_shapes(root, comp).items():
            out_f, in_f, k = shape[0], shape[1], shape[2:]
            r = min(rank, out_f, in_f)
            down = nn.Parameter(torch.randn((r, in_f, *k), generator=g) / math.sqrt(in_f * math.prod(k)))
            up = nn.Parameter(torch.zeros((out_f, r, *([1] * len(k)))))
            layers[key] = LoraLayer(down, up, 1.0)
    return LoraAdapter(name, layers, "sd")


class AdapterTrainer:
    """Subclasses set self.tc (steps, batch, lr, warmup, ema_decay, seed) and implement loss()."""

    def __init__(self, model_dir: str, tc, name: str, ranks: dict[str, int], text: bool):
        from latentd.model.loader import load_text_encoder, load_tokenizer, load_unet, load_vae
        torch.manual_seed(tc.seed)
        self.tc = tc
        self.vae, vcfg = load_vae(os.path.join(model_dir, "vae"))
        self.scale = vcfg.scaling_factor
        self.unet, _ = load_unet(os.path.join(model_dir, "unet"))
        self.te = load_text_encoder(os.path.join(model_dir, "text_encoder"))
        self.tokenizer = load_tokenizer(os.path.join(model_dir, "tokenizer"))
        for m in (self.vae, self.unet, self.te):
            m.eval().requires_grad_(False)
        lora_runtime.attach(self.unet, "unet")
        lora_runtime.attach(self.te, "text_encoder")
        parts = {"unet": (self.unet, ranks["unet"])}
        if text:
            parts["text_encoder"] = (self.te, ranks["text_encoder"])
        self.adapter = new_adapter(name, parts, tc.seed + 7)
        self.params = [p for layer in self.adapter.layers.values() for p in (layer.down, layer.up)]
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=0.0, betas=(0.9, 0.99))
        self.gen = torch.Generator().manual_seed(tc.seed + 11)
        self.step_no = 0
        self.avg: float | None = None

    def ids(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt")["input_ids"]                               # (N, 77)

    def on(self, rows: int):
        """The adapter on every one of `rows` rows, for the block."""
        return lora_runtime.active(RowMix([((self.adapter, 1.0),)] * rows))

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self) -> float:
        tc = self.tc
        for g in self.opt.param_groups:
            g["lr"] = warmup_cosine(self.step_no, tc.steps, tc.lr, tc.warmup)
        loss = self.loss()
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


def run(tr: AdapterTrainer, out_file: str, state_path: str, meta: dict, log=print,
        minutes_budget: float | None = None, checkpoint_every: int = 100, what: str = "lora") -> AdapterTrainer:
    """Train (or resume from state_path) until done or the budget; writes the EMA adapter to
    out_file at every checkpoint (diffusers/PEFT layout, model/lora_format.py)."""
    from latentd.model.lora_format import save_peft
    tc = tr.tc
    deadline = None if minutes_budget is None else time.time() + 60 * minutes_budget
    os.makedirs(os.path.dirname(os.path.abspath(state_path)), exist_ok=True)
    if os.path.exists(state_path):
        tr.load(state_path)
        log(f"{what}: resumed at step {tr.step_no} from {state_path}")
    meta = {**meta, "train": asdict(tc)}
    t_mark, s_mark = time.time(), tr.step_no
    while not tr.done:
        loss = tr.step()
        s = tr.step_no
        if s % 25 == 0 or tr.done:
            sps = (s - s_mark) * tc.batch / max(1e-9, time.time() - t_mark)
            log(f"{what} step {s}/{tc.steps} loss {loss:.5f} avg {tr.avg:.5f} "
                f"lr {warmup_cosine(s, tc.steps, tc.lr, tc.warmup):.2e} {sps:.0f} samples/s load {os.getloadavg()[0]:.2f}")
            t_mark, s_mark = time.time(), s
        last = tr.done or (deadline is not None and time.time() > deadline)
        if s % checkpoint_every == 0 or last:
            tr.save(state_path)
            # shipped in float16: half the bytes, and the engine computes in float32 anyway
            save_peft(tr.ema_adapter(), out_file, {**meta, "step": s}, dtype=torch.float16)
        if last and not tr.done:
            log(f"{what}: time budget reached at step {s}; run again with the same state file to continue")
            break
    return tr
