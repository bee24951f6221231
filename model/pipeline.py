"""Text-to-image pipeline: load_pipeline() and the step-level API of docs/CONTRACTS.md §1.

    conds  = pipe.encode(reqs)            ONE batched text-encoder call
    state  = pipe.start(req, cond)        initial latent from the request's seed, sampler plan
    pipe.step(states)                     ONE batched U-Net call (uncond + cond rows), then each
                                          state advances by its own sampler plan
    images = pipe.finish(states)          batched VAE decode + safety check + PIL

generate() is exactly these calls. Every per-request quantity (timestep, guidance scale, sampler
coefficients, noise generator) is per row, and all math after the U-Net is elementwise, so a
request gives the same image alone or in a batch as long as the networks are batch-invariant.
Latent diffusion (Rombach et al. 2022): the chain runs on z; x = D(z / scaling_factor).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from model.errors import InvalidRequest, ModelLoadError
from model.guidance import guide
from model.info import ModelInfo, check_request, info_from_configs
from model.precision import check_dtype, parse_dtype, to_device, vae_dtype
from model.samplers import Plan, denoise_step, make_plan, step_coeffs
from model.schedule import NoiseSchedule, schedule_from_config
from model.text import Conditioning, TextEncoder
from model.tiling import DEFAULT_TILE, decode as vae_decode

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None        # None -> the model's native size
    height: int | None = None
    steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"       # ddpm | ddim | euler | euler_a | dpmpp_2m
    karras: bool = False
    eta: float = 0.0                # ddim only
    seed: int = 0                   # 0 <= seed < 2**63


@dataclass
class GeneratedImage:
    image: Image.Image              # RGB, width x height (black when flagged)
    seed: int
    nsfw: bool
    timings: dict[str, float]       # seconds: "text", "denoise", "decode", "safety", "total"
    warnings: list[str]


@dataclass(eq=False)
class RequestState:
    """One request in flight. `latent` is (1, C, h, w) float32 in the sampler's space."""

    req: GenerationRequest
    cond: Conditioning
    plan: Plan
    latent: torch.Tensor
    generator: torch.Generator
    width: int
    height: int
    step: int = 0
    x0_prev: torch.Tensor | None = None       # previous denoised sample (DPM-Solver++ 2M)
    compute_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.plan.steps

    @property
    def done(self) -> bool:
        return self.step >= self.plan.steps

    @property
    def latent_shape(self) -> tuple[int, int]:
        return int(self.latent.shape[-2]), int(self.latent.shape[-1])


def _rowwise_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward that computes a 2-D input (B, K) one row at a time: BLAS picks different
    kernels (gemv vs gemm, blockings) for different B, so a row's result would depend on how many
    rows share the call. (B, L, K) inputs (attention, projections) are batch-invariant already."""
    if x.dim() != 2 or x.shape[0] == 1:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return torch.cat([torch.nn.functional.linear(x[i:i + 1], self.weight, self.bias)
                      for i in range(x.shape[0])])


def make_batch_invariant(module: torch.nn.Module) -> torch.nn.Module:
    """Route every nn.Linear of `module` through _rowwise_linear (the U-Net's time-embedding MLP
    and per-ResNet time projections, the safety checker's projection): tiny layers, so the loop
    costs little, and a request's image no longer depends on its batch-mates."""
    import types

    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.forward = types.MethodType(_rowwise_linear, m)
    return module


class Pipeline:
    """A loaded model. Build it with load_pipeline()."""

    decode_batch = 8        # VAE decode chunk (memory); chunks of 1 are padded to 2, see _decode
    decode_tile = DEFAULT_TILE  # latents larger than this (cells per side) decode in tiles; None: never

    def __init__(self, *, unet, vae, text: TextEncoder, schedule: NoiseSchedule, info: ModelInfo,
                 safety=None, device="cpu", dtype=torch.float32):
        if torch.device(device).type == "cpu":      # the promise is bit-identity on the CPU
            make_batch_invariant(unet)
            if safety is not None:
                make_batch_invariant(safety)
        self.unet, self.vae, self.text = unet, vae, text
        self.schedule, self.info, self.safety = schedule, info, safety
        self.device, self.dtype = torch.device(device), dtype
        self.vae_dtype = next(vae.parameters()).dtype
        self.latent_scale = float(vae.config.scaling_factor)
        self.latent_shift = vae.config.shift_factor
        self._plans: dict[tuple, Plan] = {}

    # -- validation ------------------------------------------------------------------------------
    def validate(self, req: GenerationRequest) -> None:
        """Raise InvalidRequest(field, message naming the allowed range) for a bad request."""
        check_request(self.info, req)

    def _size(self, req: GenerationRequest) -> tuple[int, int]:
        return (req.width or self.info.native_width, req.height or self.info.native_height)

    def _plan(self, req: GenerationRequest) -> Plan:
        key = (req.sampler, req.steps, req.karras, float(req.eta))
        if key not in self._plans:
            self._plans[key] = make_plan(self.schedule, req.sampler, req.steps, req.karras, req.eta)
        return self._plans[key]

    # -- step-level API --------------------------------------------------------------------------
    def encode(self, reqs: list[GenerationRequest]) -> list[Conditioning]:
        """ONE text-encoder call over the distinct prompts and negative prompts of `reqs`."""
        t0 = time.perf_counter()
        texts = sorted({r.prompt for r in reqs} | {r.negative_prompt for r in reqs})
        hidden, cut = self.text.encode(texts)                              # (U, 77, D)
        hidden = hidden.to(self.device, self.dtype)
        row = {t: i for i, t in enumerate(texts)}
        share = (time.perf_counter() - t0) / max(len(reqs), 1)
        out = []
        for r in reqs:
            warnings = []
            if cut[row[r.prompt]]:
                warnings.append(f"prompt truncated to {self.text.max_length} tokens")
            if cut[row[r.negative_prompt]]:
                warnings.append(f"negative prompt truncated to {self.text.max_length} tokens")
            out.append(Conditioning(cond=hidden[row[r.prompt]][None], uncond=hidden[row[r.negative_prompt]][None],
                                    warnings=warnings, seconds=share))
        return out

    def start(self, req: GenerationRequest, cond: Conditioning) -> RequestState:
        """Validate, plan, and draw the initial latent from the request's own generator:
        randn((1, C, H/f, W/f), generator=Generator("cpu").manual_seed(seed)) * init_sigma."""
        self.validate(req)
        width, height = self._size(req)
        plan = self._plan(req)
        gen = torch.Generator("cpu").manual_seed(req.seed)
        f = self.info.vae_factor
        shape = (1, self.info.latent_channels, height // f, width // f)
        latent = torch.randn(shape, generator=gen, dtype=torch.float32)
        latent = to_device(latent * plan.init_sigma, self.device)           # (1, C, h, w)
        return RequestState(req=req, cond=cond, plan=plan, latent=latent, generator=gen,
                            width=width, height=height,
                            timings={"text": float(cond.seconds)})

    def step(self, states: list[RequestState]) -> None:
        """Advance every state by one step with ONE U-Net call of 2B rows ([uncond..., cond...]).
        On an exception nothing in any state (latents, generators, counters) has changed."""
        if not states:
            return
        for i, s in enumerate(states):
            if s.done:
                raise ValueError(f"state {i} ({s.req.prompt[:30]!r}) is already done")
            if s.latent_shape != states[0].latent_shape:
                raise ValueError(f"state {i} has latent size {s.latent_shape}, not {states[0].latent_shape}; "
                                 "step() takes states of one size")
        t0 = time.perf_counter()
        gen_states = [s.generator.get_state() for s in states]
        try:
            x_next, x0 = self._step(states)
        except BaseException:
            for s, g in zip(states, gen_states):
                s.generator.set_state(g)
            raise
        share = (time.perf_counter() - t0) / len(states)
        for i, s in enumerate(states):
            s.latent = x_next[i:i + 1]
            s.x0_prev = x0[i:i + 1]
            s.step += 1
            s.compute_s += share
            s.timings["denoise"] = s.timings.get("denoise", 0.0) + share

    @torch.inference_mode()
    def _step(self, states: list[RequestState]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([s.latent for s in states])                           # (B, C, h, w) float32
        k = step_coeffs([s.plan for s in states], [s.step for s in states], self.device)
        z = (k["c_in"] * x).to(self.dtype)                                  # (B, C, h, w) U-Net input
        t = k["t"].view(-1)                                                 # (B,)
        context = torch.cat([s.cond.uncond for s in states] + [s.cond.cond for s in states])  # (2B, L, D)
        out = self.unet(torch.cat([z, z]), torch.cat([t, t]), context).float()  # (2B, C, h, w)
        b = len(states)
        w = to_device(torch.tensor([float(s.req.guidance_scale) for s in states], dtype=torch.float32),
                      self.device).view(b, 1, 1, 1)
        guided = guide(out[:b], out[b:], w)                                 # (B, C, h, w)
        noise = None
        if any(bool(s.plan.draws[s.step]) for s in states):
            noise = to_device(torch.cat([torch.randn(s.latent.shape, generator=s.generator, dtype=torch.float32)
                                         if s.plan.draws[s.step] else torch.zeros(s.latent.shape)
                                         for s in states]), self.device)
        x0_prev = None
        if any(s.x0_prev is not None for s in states):
            x0_prev = torch.cat([s.x0_prev if s.x0_prev is not None else torch.zeros_like(s.latent)
                                 for s in states])
        return denoise_step(x, guided, k, self.schedule.prediction_type, x0_prev, noise)

    def finish(self, states: list[RequestState]) -> list[GeneratedImage]:
        """Batched VAE decode (per latent size) + safety check + PIL, in the order of `states`."""
        for i, s in enumerate(states):
            if not s.done:
                raise ValueError(f"state {i} is at step {s.step} of {s.total}, not done")
        images: list[Image.Image | None] = [None] * len(states)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(states):
            groups.setdefault(s.latent_shape, []).append(i)
        t0 = time.perf_counter()
        for idx in groups.values():
            for i, im in zip(idx, self._decode(torch.cat([states[i].latent for i in idx]))):
                images[i] = im
        t1 = time.perf_counter()
        flags = [False] * len(states)
        if self.safety is not None:
            images, flags = self.safety.check(images)
        t2 = time.perf_counter()
        n = len(states)
        out = []
        for s, im, nsfw in zip(states, images, flags):
            tm = dict(s.timings)
            tm["decode"] = (t1 - t0) / n
            tm["safety"] = (t2 - t1) / n
            tm.setdefault("denoise", 0.0)
            tm["total"] = tm["text"] + tm["denoise"] + tm["decode"] + tm["safety"]
            s.compute_s += (t2 - t0) / n
            out.append(GeneratedImage(image=im, seed=s.req.seed, nsfw=bool(nsfw), timings=tm,
                                      warnings=list(s.cond.warnings)))
        return out

    @torch.inference_mode()
    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """(B, C, h, w) -> B RGB images: x = D(z / scale (+ shift)), mapped [-1, 1] -> uint8.
        oneDNN convolutions take a different path for batch 1 than for batch >= 2 on small inputs,
        so the batch shape must not depend on batch-mates: small latents (< 16x16, overhead-bound)
        decode in chunks of decode_batch with a lone one doubled; larger ones (compute-bound,
        batching gains little) decode one at a time."""
        z = latents / self.latent_scale
        if self.latent_shift is not None:
            z = z + self.latent_shift
        z = z.to(self.vae_dtype)
        chunk_n = self.decode_batch if z.shape[-2] * z.shape[-1] < 16 * 16 else 1
        parts = []
        for i in range(0, z.shape[0], chunk_n):
            chunk = z[i:i + chunk_n]
            n = chunk.shape[0]
            if n == 1 and chunk_n > 1:
                chunk = torch.cat([chunk, chunk])
            parts.append(vae_decode(self.vae, chunk, self.decode_tile)[:n])
        x = torch.cat(parts)                                                  # (B, 3, H, W)
        x = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        arr = (x * 255).round().astype(np.uint8)                            # (B, H, W, 3)
        return [Image.fromarray(a) for a in arr]

    # -- whole requests --------------------------------------------------------------------------
    def generate(self, reqs: list[GenerationRequest], callback=None) -> list[GeneratedImage]:
        """Run requests to completion, batching every step across requests of the same size.
        callback(index_in_reqs, step, total) after every denoising step of each request."""
        for r in reqs:
            self.validate(r)
        states = [self.start(r, c) for r, c in zip(reqs, self.encode(reqs))]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(states):
            groups.setdefault(s.latent_shape, []).append(i)
        for idx in groups.values():
            while True:
                active = [i for i in idx if not states[i].done]
                if not active:
                    break
                self.step([states[i] for i in active])
                if callback is not None:
                    for i in active:
                        callback(i, states[i].step, states[i].total)
        return self.finish(states)


# -- loading ---------------------------------------------------------------------------------------
def load_pipeline(source: str | os.PathLike | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, safety: bool = True,
                  config_dir: str | os.PathLike | None = None) -> Pipeline:
    """Load a model: a diffusers folder, a single-file *.safetensors (with config_dir: a diffusers
    folder of the same family for tokenizer/configs), or a hub id (network, only if named);
    None -> the bundled model at <repo>/models/shapes. safety=False skips the checker."""
    if source is None:
        source = BUNDLED
        if not os.path.isdir(source):
            raise ModelLoadError(f"the bundled model is not there ({source}): train it with "
                                 "`latentd train-shapes` or pass --model PATH")
    source = os.fspath(source)
    dtype = parse_dtype(dtype)
    check_dtype(device, dtype)
    from model.loader import load_components
    from model.safety import build_safety_checker

    c = load_components(source, device=device, dtype=dtype, config_dir=config_dir, safety=safety)
    overrides = {}
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    if os.path.isfile(os.path.join(folder, "latentd.json")):
        try:
            with open(os.path.join(folder, "latentd.json"), encoding="utf-8") as f:
                overrides = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{folder}/latentd.json: not readable JSON ({e})") from None
    info = info_from_configs(c.unet_config.to_diffusers(), c.vae_config.to_diffusers(), c.scheduler_config,
                             has_safety=c.safety_state is not None, name=c.name, overrides=overrides)
    vae = c.vae.to(vae_dtype(dtype, c.vae_config.force_upcast))   # SD's VAE overflows in float16
    checker = None
    if safety and c.safety_state is not None:
        checker = build_safety_checker(c.safety_config, c.safety_state, c.feature_extractor_config,
                                       source=c.name, device=device, dtype=dtype)
    return Pipeline(unet=c.unet.eval().requires_grad_(False), vae=vae.eval().requires_grad_(False),
                    text=TextEncoder(c.tokenizer, c.text_encoder.eval().requires_grad_(False)),
                    schedule=schedule_from_config(c.scheduler_config), info=info,
                    safety=checker, device=device, dtype=dtype)
