"""Text-to-image pipeline: load_pipeline() and the step-level API of docs/CONTRACTS.md §1.

    conds  = pipe.encode(reqs)            text encoder over the distinct texts (on the CPU one text a call)
    state  = pipe.start(req, cond)        initial latent from the request's seed, sampler plan
    pipe.step(states)                     ONE batched U-Net call (uncond + cond rows), then each
                                          state advances by its own sampler plan
    images = pipe.finish(states)          batched VAE decode + safety check + PIL

generate() is exactly these calls. Every per-request quantity (timestep, guidance scale, sampler
coefficients, noise generator) is per row, and all math after the U-Net is elementwise, so a
request gives the same image alone or in a batch as long as the networks are batch-invariant.
Edits (img2img, inpainting; model/edit.py) are the same calls: start() encodes the init image
(one image per call) and noises it, step() gives an inpainting U-Net its extra channels and
blends the unmasked region, all per row, so edits and text-to-image share one U-Net call.
Latent diffusion (Rombach et al. 2022): the chain runs on z; x = D(z / scaling_factor).
A model family (SD 1.x/2.x, SDXL) is its parts (model/conditioner.py): the text conditioning
encode() runs, the added conditioning start() builds per row (SDXL: pooled text + size ids) and
step() concatenates like the context, and the family's guidance rules.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from latentd.model.edit import EditState, Encoder, blend, overlay, start_edit
from latentd.model.errors import ModelLoadError
from latentd.model.guidance import guide
from latentd.model.info import BUNDLED, ModelInfo
from latentd.model import lora_format, lora_runtime
from latentd.model.lora_runtime import RowMix, mix_key, text_mix
from latentd.model.request import (DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, complete, default_eta,
                                   kind_of, start_step)
from latentd.model.precision import check_dtype, parse_dtype, to_device, vae_dtype
from latentd.model.samplers import Plan, denoise_step, make_plan, step_coeffs
from latentd.model.schedule import NoiseSchedule, schedule_from_config
from latentd.model.conditioner import Conditioner
from latentd.model.text import Conditioning
from latentd.model.tiling import DEFAULT_TILE, decode as vae_decode



@dataclass(frozen=True)
class GenerationRequest:
    """One image. Complete (every value there, as the service and `latentd generate` send it, or
    as Pipeline.validate returns it) before Pipeline.start; Pipeline.generate completes its own."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None        # None -> the init image's size, else the model's native size
    height: int | None = None
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    sampler: str = DEFAULT_SAMPLER  # model.request.SAMPLERS
    karras: bool = False
    eta: float | None = None        # ddim, tcd (model.request.ETA_SAMPLERS); None -> the sampler's default
    timestep_spacing: str | None = None  # linspace | leading | trailing; None -> the scheduler config's
    cache_interval: int = 1         # DeepCache (model/deepcache.py): a full U-Net step every N steps
    seed: int = 0                   # 0 <= seed < 2**63
    # classifier guidance (model/classifier.py): ((head, label), ...) sorted, and its scale;
    # () = none. Build with model.classifier_spec.resolve from the API's {"color": ..., "scale": ...}.
    classifier_targets: tuple[tuple[str, str], ...] = ()
    classifier_scale: float = 0.0
    init_image: Image.Image | None = field(default=None, compare=False, repr=False)  # img2img / inpaint
    mask: Image.Image | None = field(default=None, compare=False, repr=False)  # white = repaint
    strength: float | None = None   # edits: 0 < s <= 1 (None before Pipeline.validate: its default)
    # LoRA adapters bound to this model (Pipeline.load_lora) and their scales, applied to this
    # request's rows only (model/lora_runtime.py); () = none
    loras: tuple = field(default=(), repr=False)

    @property
    def kind(self) -> str:
        return kind_of(self.init_image is not None, self.mask is not None)

    @property
    def run_steps(self) -> int:
        """Steps that actually run (of a complete request): all for text-to-image,
        int(steps * strength) for an edit."""
        return self.steps - start_step(self.steps, self.strength)


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
    edit: EditState | None = None             # img2img / inpainting tensors (model/edit.py)
    # added U-Net conditioning of the conditional and unconditional rows (SDXL: {"text_embeds":
    # (1, P), "time_ids": (1, 6)}, model/added_cond.py); None: the family has none
    added: dict[str, torch.Tensor] | None = None
    added_uncond: dict[str, torch.Tensor] | None = None
    # DeepCache: this request's deep features from its last full step, (rows, C1, h, w) for its
    # [uncond, cond] rows of the U-Net call (model/deepcache.py); None before the first
    deep: torch.Tensor | None = None
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


SMALL_TOKENS = 64   # (B, L, K) inputs with fewer tokens per row than this run one row at a time


def _rowwise_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward that computes a 2-D input (B, K) one row at a time: BLAS picks different
    kernels (gemv vs gemm, blockings) for different B, so a row's result would depend on how many
    rows share the call. (B, L, K) inputs (attention, projections) are batch-invariant once the
    matrix product has enough rows (MKL's small-matrix kernels differ from its blocked ones below
    about 16 rows, e.g. the 2x2 tokens of a 64 px image's lowest attention level): with fewer than
    SMALL_TOKENS tokens per row they are computed one batch row at a time too.
    Equal 2-D rows are computed once: these inputs are functions of the timestep, and a batch holds
    each timestep at least twice (the conditional and unconditional rows of classifier-free
    guidance), often more (requests that started together)."""
    if x.dim() == 3 and x.shape[0] > 1 and x.shape[1] < SMALL_TOKENS:
        return torch.cat([torch.nn.functional.linear(x[i:i + 1], self.weight, self.bias)
                          for i in range(x.shape[0])])                  # (B, L, N), each row alone
    if x.dim() != 2 or x.shape[0] == 1:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    uniq, inverse = torch.unique(x, dim=0, return_inverse=True)         # (U, K), (B,)
    out = torch.cat([torch.nn.functional.linear(uniq[i:i + 1], self.weight, self.bias)
                     for i in range(uniq.shape[0])])                     # (U, N), each row alone
    return out[inverse]                                                  # (B, N)


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

    def __init__(self, *, unet, vae, conditioner: Conditioner, schedule: NoiseSchedule, info: ModelInfo,
                 safety=None, device="cpu", dtype=torch.float32, classifier=None):
        if torch.device(device).type == "cpu":      # the promise is bit-identity on the CPU
            make_batch_invariant(unet)
            if safety is not None:
                make_batch_invariant(safety)
        self.unet, self.vae, self.conditioner = unet, vae, conditioner
        self.schedule, self.info, self.safety = schedule, info, safety
        self.classifier = classifier              # LatentClassifier for classifier guidance, or None
        self.device, self.dtype = torch.device(device), dtype
        self.vae_dtype = next(vae.parameters()).dtype
        self.latent_scale = float(vae.config.scaling_factor)
        self.latent_shift = vae.config.shift_factor
        self._plans: dict[tuple, Plan] = {}
        self.encoder = Encoder(vae, self.latent_scale, self.latent_shift, self.device, self.vae_dtype)
        self.lora_shapes = lora_format.attach_model(self)          # layer key -> weight shape

    def load_lora(self, source, name: str | None = None):
        """A LoRA file (path) or (state dict, metadata) bound to this model: LoraAdapter on the
        pipeline's device and dtype; LoraFormatError (a ValueError naming the file and layer)
        for another adapter kind or another base model."""
        return lora_format.load(self, source, name)

    @property
    def text(self):
        """The family's text conditioning (model/text.py TextEncoder, model/text_sdxl.py DualTextEncoder)."""
        return self.conditioner.text

    # -- validation ------------------------------------------------------------------------------
    def validate(self, req: GenerationRequest) -> GenerationRequest:
        """The engine's boundary for its own callers: the request with its size, eta and an edit's
        strength filled in (model.request.complete), or InvalidRequest(field, message naming the
        allowed range). The service resolves before and sends complete requests."""
        return complete(self.info, req)

    @property
    def classifier_heads(self) -> dict[str, tuple[str, ...]] | None:
        """Head -> labels of the model's classifier (None: none); the same as info.classifier."""
        return self.info.classifier

    def _plan(self, r: GenerationRequest) -> Plan:
        eta = float(default_eta(r.sampler, r.eta))
        key = (r.sampler, r.steps, r.karras, eta, r.strength, r.timestep_spacing)
        if key not in self._plans:
            self._plans[key] = make_plan(self.schedule, r.sampler, r.steps, r.karras, eta, r.strength,
                                         r.timestep_spacing)
        return self._plans[key]

    # -- step-level API --------------------------------------------------------------------------
    def encode(self, reqs: list[GenerationRequest]) -> list[Conditioning]:
        """Encode the distinct prompts and negative prompts of `reqs`: one text-encoder call over
        all of them, or on the CPU one call per text (see below)."""
        if not reqs:
            return []
        t0 = time.perf_counter()
        zero_empty = self.conditioner.zero_empty_negative     # SDXL: no negative prompt -> zeros
        # a text is encoded once per distinct text-encoder adapter mix it is used with
        texts = sorted({(r.prompt, text_mix(r.loras)) for r in reqs}
                       | {(r.negative_prompt, text_mix(r.loras)) for r in reqs if r.negative_prompt or not zero_empty},
                       key=lambda k: (k[0], mix_key(k[1])))
        if self.device.type == "cpu":
            # Batch invariance: PyTorch's CPU elementwise kernels run SIMD over the flattened
            # tensor and finish its last numel % 32 float32 elements (per thread chunk) with the
            # scalar function, and scalar and SIMD sigmoid/exp/erf differ in the last ulp. CLIP's
            # MLP activation on (U, 77, I) puts the last text's final elements in that tail, whose
            # width depends on U (tiny model, I = 37: 6 texts -> 6 tail elements, 2 -> 1), so a
            # prompt's (1, 77, D) hidden state depended on which other prompts shared the call.
            # One (1, 77) call per text: a text's tensors have the same shape whatever the batch.
            # The encoder runs once per request (not per step), so this costs little.
            parts = [self._embed([t], mix) for t, mix in texts]
        else:                                                              # one call per adapter mix
            mixes = sorted({mix for _, mix in texts}, key=mix_key)
            texts = [k for mix in mixes for k in texts if k[1] == mix]
            parts = [self._embed([t for t, m in texts if m == mix], mix) for mix in mixes]
        hidden = torch.cat([h for h, _, _ in parts])                       # (U, 77, D)
        pooled = None if parts[0][1] is None else torch.cat([p for _, p, _ in parts])   # (U, P)
        cut = [c for _, _, cs in parts for c in cs]
        hidden = hidden.to(self.device, self.dtype)
        if pooled is not None:
            pooled = pooled.to(self.device, self.dtype)
        row = {t: i for i, t in enumerate(texts)}
        share = (time.perf_counter() - t0) / max(len(reqs), 1)
        out = []
        for r in reqs:
            warnings = []
            mix = text_mix(r.loras)
            if cut[row[(r.prompt, mix)]]:
                warnings.append(f"prompt truncated to {self.text.max_length} tokens")
            i, j = row[(r.prompt, mix)], row.get((r.negative_prompt, mix))
            if j is not None and cut[j]:
                warnings.append(f"negative prompt truncated to {self.text.max_length} tokens")
            cond = hidden[i][None]                                         # (1, 77, D)
            uncond = hidden[j][None] if j is not None else torch.zeros_like(cond)
            c = Conditioning(cond=cond, uncond=uncond, warnings=warnings, seconds=share)
            if pooled is not None:                                         # (1, P) each
                c.pooled = pooled[i][None]
                c.uncond_pooled = pooled[j][None] if j is not None else torch.zeros_like(c.pooled)
            out.append(c)
        return out

    def _embed(self, texts: list[str], mix) -> tuple:
        """The conditioner's embed(texts) with a text-encoder adapter mix on every row."""
        with lora_runtime.active(RowMix([mix] * len(texts), self.device) if mix else None):
            return self.text.embed(texts)

    def start(self, req: GenerationRequest, cond: Conditioning) -> RequestState:
        """Plan a complete request (validated before: Pipeline.validate, or the service's
        resolve and check) and draw the initial latent from its own generator:
        randn((1, C, H/f, W/f), generator=Generator("cpu").manual_seed(seed)) * init_sigma, or for
        an edit the init image's latent noised to the first step it runs (model/edit.py)."""
        if req.width is None or req.height is None or (req.kind != "text" and req.strength is None):
            raise ValueError("Pipeline.start takes a complete request (Pipeline.validate fills it)")
        plan = self._plan(req)
        gen = torch.Generator("cpu").manual_seed(req.seed)
        f = self.info.vae_factor
        shape = (1, self.info.latent_channels, req.height // f, req.width // f)
        t0 = time.perf_counter()
        latent, edit = start_edit(self.encoder, plan, req, req.width, req.height, shape, gen,
                                  self.info.inpaint_unet, self.device)       # (1, C, h, w)
        timings = {"text": float(cond.seconds)}
        if req.init_image is not None:
            timings["encode"] = time.perf_counter() - t0
        added = added_uncond = None
        if self.conditioner.added is not None:
            added, added_uncond = self.conditioner.added.rows(req.width, req.height, cond.pooled,
                                                              cond.uncond_pooled, self.device, self.dtype)
        return RequestState(req=req, cond=cond, plan=plan, latent=latent, generator=gen,
                            width=req.width, height=req.height, edit=edit, timings=timings,
                            added=added, added_uncond=added_uncond)

    def save_row(self, state: RequestState, meta: dict | None = None):
        """The state of a request in flight as one small serialisable value (model/row_state.py
        RowState; .to_bytes()): parks it, checkpoints it, moves it to another worker."""
        from latentd.model import row_state

        return row_state.save(self, state, meta)

    def resume(self, req: GenerationRequest, cond: Conditioning, row) -> RequestState:
        """start() for a request saved mid-run (save_row, here or on another process with the same
        model): the saved latent, sampler history, generator state and edit tensors replace fresh
        ones (no init-image encode), so it goes on exactly as the saved run would have.
        RowStateError (a ValueError) when `row` is not of this request, model and plan."""
        from latentd.model import row_state

        plan = self._plan(req)
        f = self.info.vae_factor
        shape = (1, self.info.latent_channels, req.height // f, req.width // f)
        latent, x0_prev, gen, edit, deep = row_state.restore(self, req, plan, row, shape)
        added = added_uncond = None
        if self.conditioner.added is not None:      # recomputed from the request, like start()
            added, added_uncond = self.conditioner.added.rows(req.width, req.height, cond.pooled,
                                                              cond.uncond_pooled, self.device, self.dtype)
        return RequestState(req=req, cond=cond, plan=plan, latent=latent, generator=gen,
                            width=req.width, height=req.height, step=row.step, x0_prev=x0_prev,
                            edit=edit, timings={"text": float(cond.seconds)},
                            added=added, added_uncond=added_uncond, deep=deep)

    def step(self, states: list[RequestState]) -> None:
        """Advance every state by one step with ONE U-Net call of up to 2B rows ([uncond..., cond...];
        a family with skip_uncond_at_one runs no uncond row for a request with guidance <= 1).
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
        z_in = z
        if self.info.inpaint_unet:      # + [mask, masked-image latent]: (B, 2C + 1, h, w)
            z_in = torch.cat([z, torch.cat([s.edit.extra for s in states]).to(self.dtype)], dim=1)
        t = k["t"].view(-1)                                                 # (B,)
        b = len(states)
        un = self._uncond_rows(states)                                      # rows that run uncond (U)
        # their indices as a device tensor (a pinned, non-blocking copy, as every per-step value)
        ui = None if len(un) == b else to_device(torch.tensor(un, dtype=torch.long), self.device)
        out_u, out_c = self._unet_rows(states, un, ui, z_in, t)             # (U, C, h, w), (B, C, h, w)
        w = to_device(torch.tensor([float(s.req.guidance_scale) for s in states], dtype=torch.float32),
                      self.device).view(b, 1, 1, 1)
        if len(un) == b:
            guided = guide(out_u, out_c, w)                                 # (B, C, h, w)
        else:                   # the other rows are conditional only (diffusers: no CFG at w <= 1)
            guided = out_c.clone()
            if un:
                guided[ui] = guide(out_u, out_c[ui], w[ui])
        guided = self._classifier_guidance(states, z, t, k, guided)
        noise = None
        if any(bool(s.plan.draws[s.step]) for s in states):
            noise = to_device(torch.cat([torch.randn(s.latent.shape, generator=s.generator, dtype=torch.float32)
                                         if s.plan.draws[s.step] else torch.zeros(s.latent.shape)
                                         for s in states]), self.device)
        x0_prev = None
        if any(s.x0_prev is not None for s in states):
            x0_prev = torch.cat([s.x0_prev if s.x0_prev is not None else torch.zeros_like(s.latent)
                                 for s in states])
        x_next, x0 = denoise_step(x, guided, k, self.schedule.prediction_type, x0_prev, noise)
        if any(s.edit is not None and s.edit.mask is not None for s in states):
            x_next = torch.cat([blend(x_next[i:i + 1], s.edit, k["ka"][i:i + 1], k["kb"][i:i + 1])
                                if s.edit is not None and s.edit.mask is not None else x_next[i:i + 1]
                                for i, s in enumerate(states)])
        return x_next, x0

    def _uncond_rows(self, states: list[RequestState]) -> list[int]:
        """Indices of the states whose request runs an unconditional row: all, except (families
        with skip_uncond_at_one) requests with guidance <= 1."""
        if not self.conditioner.skip_uncond_at_one:
            return list(range(len(states)))
        return [i for i, s in enumerate(states) if s.req.guidance_scale > 1.0]

    def _unet_rows(self, states, un: list[int], ui: torch.Tensor | None, z_in: torch.Tensor, t: torch.Tensor):
        """ONE U-Net call over [uncond rows of `un`..., cond rows of all states...], each row
        with its own context (and added conditioning), -> (out_u (U, C, h, w), out_c (B, C, h, w))
        float32. A lone row runs doubled: oneDNN convolutions take another path for batch 1, so a
        row's result would depend on whether it had company."""
        z_u, t_u = (z_in, t) if ui is None else (z_in[ui], t[ui])
        x = torch.cat([z_u, z_in])                                          # (U + B, C', h, w)
        tt = torch.cat([t_u, t])                                            # (U + B,)
        context = torch.cat([states[i].cond.uncond for i in un] + [s.cond.cond for s in states])  # (U + B, L, D)
        added = None
        if states[0].added is not None:                                     # key by key, like the context
            added = {key: torch.cat([states[i].added_uncond[key] for i in un] + [s.added[key] for s in states])
                     for key in states[0].added}
        n = x.shape[0]
        rows = [states[i].req.loras for i in un] + [s.req.loras for s in states]     # adapters per row
        if n == 1:
            x, tt, context = torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([context, context])
            added = None if added is None else {key: torch.cat([v, v]) for key, v in added.items()}
            rows = rows * 2
        with lora_runtime.active(RowMix(rows, self.device) if any(rows) else None):
            if all(s.req.cache_interval == 1 for s in states):
                out = (self.unet(x, tt, context) if added is None else self.unet(x, tt, context, added))[:n].float()
            else:
                out = self._cached_unet(states, un, x, tt, context, added)[:n].float()
        return out[:len(un)], out[len(un):]

    def _cached_unet(self, states, un: list[int], x, tt, context, added) -> torch.Tensor:
        """The U-Net call with DeepCache rows (model/deepcache.py): a request at a full step (step
        % cache_interval == 0, or nothing cached yet) runs the deep path on its rows and keeps
        their deep features; the others reuse theirs. Row order as in _unet_rows (doubled when
        lone: the copy is a full row like its original, and only the first is kept)."""
        from latentd.model import deepcache
        has_u = {id(states[i]) for i in un}
        owners = [(states[i], 0) for i in un] + [(s, 1 if id(s) in has_u else 0) for s in states]  # (state, its row)
        owners += [owners[0]] if x.shape[0] > len(owners) else []          # the lone row's copy

        def full(s):
            return s.deep is None or deepcache.full_step(s.step, s.plan.steps, s.req.cache_interval)
        deep = [j for j, (s, _) in enumerate(owners) if full(s)]
        cached = [s.deep[k:k + 1] for s, k in owners if not full(s)]
        out, feats = deepcache.forward(self.unet, x, tt, context, added, deep,
                                       torch.cat(cached) if cached else None)
        fresh: dict[int, list[torch.Tensor]] = {}
        for j, f in zip(deep, feats.split(1)):
            s, k = owners[j]
            if s.req.cache_interval > 1 and j < len(un) + len(states):
                fresh.setdefault(id(s), []).append(f)
        for s in states:
            if id(s) in fresh:
                s.deep = torch.cat(fresh[id(s)])                       # (rows, C1, h, w)
        return out

    def _classifier_guidance(self, states, z, t, k, guided: torch.Tensor) -> torch.Tensor:
        """Shift the guided noise estimate of the rows that ask for classifier guidance:
        eps_hat = eps - s sqrt(1 - abar_t) grad log p(y | z_t, t)  (model/classifier.py). Only
        those rows pay for the gradient, one row at a time (batch invariance); the others are
        returned untouched. z: (B, C, h, w) VP latent the U-Net saw; guided: (B, C, h, w)."""
        rows = [i for i, s in enumerate(states) if s.req.classifier_targets and s.req.classifier_scale > 0]
        if not rows:
            return guided
        from latentd.model.classifier import guided_eps, log_prob_grad
        from latentd.model.guidance import from_eps, to_x0_eps
        ptype = self.schedule.prediction_type
        shifted = {}
        with torch.inference_mode(False):     # autograd needs normal tensors: row copies
            for i in rows:
                req = states[i].req
                heads = self.classifier.cfg.heads
                targets = {h: heads[h].index(lbl) for h, lbl in req.classifier_targets}
                zi = z[i:i + 1].float().clone()
                grad = log_prob_grad(self.classifier, zi, t[i:i + 1].clone(), targets)   # (1, C, h, w)
                alpha, sigma = k["alpha"][i:i + 1].clone(), k["sigma"][i:i + 1].clone()
                _, eps = to_x0_eps(guided[i:i + 1].clone(), zi, alpha, sigma, ptype)
                eps_hat = guided_eps(eps, sigma, req.classifier_scale, grad)
                shifted[i] = from_eps(eps_hat, zi, alpha, sigma, ptype).detach()
        guided = guided.clone()
        for i, row in shifted.items():
            guided[i:i + 1] = row
        return guided

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
        for i, s in enumerate(states):      # before the safety check: it judges the final image
            if s.req.mask is not None:
                images[i] = overlay(images[i], s.req.init_image, s.req.mask)
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
            tm["total"] = tm["text"] + tm.get("encode", 0.0) + tm["denoise"] + tm["decode"] + tm["safety"]
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
        """Validate (and complete) requests, then run them (run())."""
        return self.run([self.validate(r) for r in reqs], callback)

    def run(self, reqs: list[GenerationRequest], callback=None) -> list[GeneratedImage]:
        """Run complete requests to completion, batching every step across requests of the same
        size. callback(index_in_reqs, step, total) after every denoising step of each request."""
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
    from latentd.model.loader import load_components
    from latentd.model.safety import build_safety_checker

    c = load_components(source, device=device, dtype=dtype, config_dir=config_dir, safety=safety)
    vae = c.vae.to(vae_dtype(dtype, c.vae_config.force_upcast))   # SD's VAE overflows in float16
    checker = None
    if safety and c.safety_state is not None:
        checker = build_safety_checker(c.safety_config, c.safety_state, c.feature_extractor_config,
                                       source=c.name, device=device, dtype=dtype)
    from latentd.model.classifier import load_classifier
    classifier = load_classifier(c.folder / "classifier", device) if c.info.classifier else None
    from latentd.model.conditioner import conditioner_for
    return Pipeline(unet=c.unet.eval().requires_grad_(False), vae=vae.eval().requires_grad_(False),
                    conditioner=conditioner_for(c),
                    schedule=schedule_from_config(c.scheduler_config), info=c.info,
                    safety=checker, device=device, dtype=dtype, classifier=classifier)
