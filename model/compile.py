"""torch.compile of the U-Net step, with shape buckets so that recompiles are bounded and counted.

A compiled graph is specialised to its input shapes (dynamic=False: static shapes give the
fastest kernels and, on CUDA, allow CUDA graphs). The shapes of a U-Net call are (rows, h, w):
rows = 2 x requests (classifier-free guidance), h x w the latent size. Rows are padded up to the
next bucket (powers of two, capped at 2 x max_batch), so a worker with max_batch 16 compiles at
most 5 graphs per latent size (2, 4, 8, 16, 32 rows) however its batches vary; the warm-up at
start-up compiles them before the worker says it is ready.

Padding rows repeat the last real row and are dropped from the output. Every op of the U-Net acts
on each row on its own (convolutions, GroupNorm and attention are per sample), so the padding
does not change the real rows beyond the kernels' rounding; compiled kernels are not
bit-identical to eager ones, which is why compiling is opt-in and off by default (the CPU's
bit-identity promise is for the eager path).

Modes: "on" (inductor, default mode), "max-autotune" (inductor tunes its GEMM/conv choices; a
longer warm-up), "cudagraphs" (inductor + CUDA graphs, "reduce-overhead": removes the launch
overhead of ~1,000 kernels per step; CUDA only).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

MODES = ("off", "on", "max-autotune", "cudagraphs")
_TORCH_MODE = {"on": "default", "max-autotune": "max-autotune-no-cudagraphs", "cudagraphs": "reduce-overhead"}


def row_buckets(max_batch: int) -> tuple[int, ...]:
    """U-Net row counts compiled for up to `max_batch` requests: powers of two from 2 (one
    request with its unconditional row) up to, and ending at, 2 * max_batch."""
    top = 2 * max(1, int(max_batch))
    out, b = [], 2
    while b < top:
        out.append(b)
        b *= 2
    return tuple(out + [top])


def check_mode(mode: str, device: torch.device | str = "cpu") -> str:
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "cudagraphs" and torch.device(device).type != "cuda":
        raise ValueError("compile mode 'cudagraphs' needs a CUDA device")
    return mode


def _raise_recompile_limit(n: int) -> None:
    """Dynamo falls back to eager after `recompile_limit` (8) shapes of one function; allow ours."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            setattr(cfg, name, n)


class CompiledUNet(nn.Module):
    """Drop-in for the U-Net in Pipeline: forward(x (R, C, h, w), t (R,), context (R, L, D)[, added
    {name: (R, ...)}]) pads R up to its bucket, runs the compiled graph, returns (R, C, h, w).

    `compiles` counts the distinct (rows, h, w, dtype, L) shapes run so far, each of which is one
    compilation (dynamic=False recompiles on a new shape and only then); `on_compile(key, seconds)`
    is called after each (metrics)."""

    def __init__(self, unet: nn.Module, mode: str = "on", max_batch: int = 16, backend: str = "inductor",
                 max_sizes: int = 8):
        super().__init__()
        if mode == "off":
            raise ValueError("CompiledUNet with mode 'off': use the U-Net itself")
        self.module = unet
        self.config = unet.config
        self.mode = mode
        self.buckets = row_buckets(max_batch)
        _raise_recompile_limit(len(self.buckets) * max_sizes + 8)
        kw = {"mode": _TORCH_MODE[mode]} if backend == "inductor" else {}
        self.compiled = torch.compile(unet, backend=backend, dynamic=False, **kw)
        self.seen: dict[tuple, float] = {}       # shape key -> seconds its first (compiling) call took
        self.on_compile: Callable[[tuple, float], None] | None = None

    @property
    def compiles(self) -> int:
        return len(self.seen)

    def bucket(self, rows: int) -> int:
        """The smallest bucket >= rows; a row count above every bucket runs (and compiles) as is."""
        return next((b for b in self.buckets if b >= rows), rows)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(n)     # (R,)
        b = self.bucket(n)

        def pad(v: torch.Tensor) -> torch.Tensor:                          # repeat the last row
            return torch.cat([v, v[-1:].expand(b - n, *v.shape[1:])]) if b > n else v

        x, t, context = pad(x), pad(t), pad(context)                       # (B, C, h, w), (B,), (B, L, D)
        extra = () if added is None else ({k: pad(v).contiguous() for k, v in added.items()},)
        key = (b, int(x.shape[-2]), int(x.shape[-1]), x.dtype, int(context.shape[1]))
        if self.mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        first = key not in self.seen
        t0 = time.perf_counter()
        out = self.compiled(x.contiguous(), t.contiguous(), context.contiguous(), *extra)
        if first:
            self.seen[key] = time.perf_counter() - t0
            if self.on_compile is not None:
                self.on_compile(key, self.seen[key])
        out = out[:n]
        # CUDA graphs reuse their output buffer at the next replay: hand back a copy.
        return out.clone() if self.mode == "cudagraphs" else out


def enable(pipe, mode: str, max_batch: int, backend: str = "inductor") -> CompiledUNet | None:
    """Swap pipe.unet for a CompiledUNet (mode "off": leave it; returns None)."""
    check_mode(mode, pipe.device)
    if mode == "off":
        return None
    unet = pipe.unet.module if isinstance(pipe.unet, CompiledUNet) else pipe.unet
    pipe.unet = CompiledUNet(unet, mode, max_batch, backend)
    return pipe.unet


@torch.inference_mode()
def warmup(pipe, sizes: list[tuple[int, int]] | None = None, rows: tuple[int, ...] | None = None) -> float:
    """Compile every bucket for every latent size (default: the model's native size) before the
    first request, with inputs shaped and typed as Pipeline.step builds them. Returns seconds."""
    unet = pipe.unet
    if not isinstance(unet, CompiledUNet):
        return 0.0
    f = pipe.info.vae_factor
    sizes = sizes or [(pipe.info.native_height // f, pipe.info.native_width // f)]
    c_in, length, dim = unet.config.in_channels, pipe.text.max_length, unet.config.cross_attention_dim
    t0 = time.perf_counter()
    for h, w in sizes:
        for r in rows or unet.buckets:
            x = torch.zeros((r, c_in, h, w), device=pipe.device, dtype=pipe.dtype)
            t = torch.full((r,), 500.0, device=pipe.device, dtype=torch.float32)
            ctx = torch.zeros((r, length, dim), device=pipe.device, dtype=pipe.dtype)
            unet(x, t, ctx, *_added_zeros(unet.config, r, pipe.device, pipe.dtype))
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return time.perf_counter() - t0


def _added_zeros(cfg, rows: int, device, dtype) -> tuple:
    """() or ({"text_embeds": (R, P), "time_ids": (R, 6)},) shaped as Pipeline.step builds them."""
    if cfg.addition_embed_type != "text_time":
        return ()
    from latentd.model.added_cond import TIME_IDS

    pooled = cfg.projection_class_embeddings_input_dim - TIME_IDS * cfg.addition_time_embed_dim
    return ({"text_embeds": torch.zeros((rows, pooled), device=device, dtype=dtype),
             "time_ids": torch.zeros((rows, TIME_IDS), device=device, dtype=dtype)},)
