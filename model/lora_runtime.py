"""LoRA adapters applied per row of one model call (Hu et al. 2021; per-row batching as in S-LoRA,
Sheng et al. 2023, and Punica, Chen et al. 2023).

A layer W (Linear or Conv2d) with an adapter computes  W x + s * B (A x)  for the rows that use
it, where A (r, in[, kh, kw]) is the down projection, B (out, r[, 1, 1]) the up projection,
s = request scale * alpha / r. The base weights are never merged: each U-Net call gets a RowMix
(which adapters, at which scale, on which rows), so the next step can carry another mix.

Exactness: a row's result must not depend on its batch-mates. For each adapter (in one fixed
order, by name) the rows that use it are gathered, their delta computed in one product and added
row by row; a row sees the same adapters in the same order whatever shares the call. Convolution
deltas over a single row run doubled (oneDNN takes another path for batch 1, as the pipeline's
lone row), and 2-D inputs (the time-embedding projections) one row at a time, as
model/pipeline.py's _rowwise_linear does for their base layers.

Layers are found by forward hooks installed on every Linear/Conv2d of a component; a hook does
nothing when no mix is active or the active adapters do not touch its layer. A 1x1 convolution
computed as a matrix product on (B, HW, C) tokens (attention.py's _pointwise) calls apply() itself.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from latentd.model.layout import memory_format_of as _layout

KEY_ATTR = "_latentd_lora_key"        # "<component>:<module path>", set by attach()


@dataclass
class LoraLayer:
    """One adapted layer: down A (r, in) or (r, in, kh, kw), up B (out, r) or (out, r, 1, 1),
    alpha / r as `scale` (each format defines alpha its own way, model/lora_format.py)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def to(self, device, dtype) -> "LoraLayer":
        return LoraLayer(self.down.to(device, dtype), self.up.to(device, dtype), self.scale)

    def delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """B (A x) for the rows of x, shaped like module(x)."""
        if isinstance(module, nn.Conv2d):
            if x.dim() == 3:                 # tokens (B, HW, C) of a 1x1 conv run as a matmul
                return F.linear(F.linear(x, self.down.flatten(1)), self.up.flatten(1))
            lone = x.shape[0] == 1
            xx = torch.cat([x, x]) if lone else x
            h = F.conv2d(xx, self.down, None, module.stride, module.padding, module.dilation)
            out = F.conv2d(h, self.up)
            return out[:1] if lone else out
        if x.dim() == 2 and x.shape[0] > 1:  # one row at a time, like the base layer
            return torch.cat([F.linear(F.linear(x[i:i + 1], self.down), self.up) for i in range(x.shape[0])])
        return F.linear(F.linear(x, self.down), self.up)


@dataclass(eq=False)      # compared and hashed by identity: requests carry it
class LoraAdapter:
    """A loaded adapter: layers keyed "<component>:<module path>" (components "unet",
    "text_encoder", "text_encoder_2"), and what a listing shows about it."""

    name: str
    layers: dict[str, LoraLayer]
    family: str = "sd"                 # "sd" | "sdxl": the base models it was made for
    meta: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((layer.rank for layer in self.layers.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in (layer.down, layer.up))

    @property
    def components(self) -> set[str]:
        return {k.split(":", 1)[0] for k in self.layers}

    @property
    def touches_text(self) -> bool:
        return any(not k.startswith("unet:") for k in self.layers)

    def to(self, device, dtype) -> "LoraAdapter":
        return LoraAdapter(self.name, {k: v.to(device, dtype) for k, v in self.layers.items()}, self.family, self.meta)


# One row's adapters: ((adapter, request scale), ...); () = none.
RowAdapters = tuple[tuple[LoraAdapter, float], ...]


class RowMix:
    """The adapters of one model call: per adapter (ordered by name), the rows that use it as an
    index tensor (None: every row) and each row's scale (request scale x alpha / r, per layer)."""

    def __init__(self, rows: list[RowAdapters], device: torch.device | str = "cpu"):
        self.rows, self.device = list(rows), device
        self._scale_cache: dict[tuple, torch.Tensor] = {}
        by_name: dict[str, tuple[LoraAdapter, list[int], list[float]]] = {}
        for i, mix in enumerate(rows):
            for adapter, scale in mix:
                if scale == 0.0:         # scale 0 is the base model, exactly
                    continue
                a, idx, sc = by_name.setdefault(adapter.name, (adapter, [], []))
                if a is not adapter:
                    raise ValueError(f"two different adapters named {adapter.name!r} in one call")
                idx.append(i)
                sc.append(float(scale))
        n = len(rows)
        self.groups = []
        for name in sorted(by_name):
            adapter, idx, sc = by_name[name]
            index = None if idx == list(range(n)) else torch.tensor(idx, dtype=torch.long, device=device)
            self.groups.append((adapter, index, torch.tensor(sc, dtype=torch.float32, device=device)))

    def __bool__(self) -> bool:
        return bool(self.groups)

    def subset(self, rows: list[int]) -> "RowMix | None":
        """The mix of a call on these rows of this one (in this order)."""
        mix = RowMix([self.rows[i] for i in rows], self.device)
        return mix if mix else None

    def apply(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        key = getattr(module, KEY_ATTR, None)
        inplace = not torch.is_grad_enabled()      # serving: no new activation per adapter
        fmt = None if inplace else _layout(out)
        for adapter, index, scales in self.groups:
            layer = adapter.layers.get(key)
            if layer is None:
                continue
            # gathered rows keep x's memory layout: a convolution's kernel (and its rounding)
            # depends on the layout, and a row alone sees x as it is
            xs = x if index is None else x.index_select(0, index).contiguous(memory_format=_layout(x))
            d = layer.delta(module, xs)                                      # like out[index]
            s = self._scales(scales, layer.scale, d)
            if inplace:
                d.mul_(s)
                out = out.add_(d) if index is None else out.index_add_(0, index, d)
            else:
                d = d * s
                out = out + d if index is None else out.index_add(0, index, d)
        # in place, the output keeps the base layer's layout; otherwise it is restored, so later
        # layers run the same kernels
        return out if inplace else out.contiguous(memory_format=fmt)

    def _scales(self, scales: torch.Tensor, layer_scale: float, d: torch.Tensor) -> torch.Tensor:
        """Per-row scale x the layer's alpha / r, shaped to broadcast over d (cached per value)."""
        key = (id(scales), layer_scale, d.dtype, d.dim())
        s = self._scale_cache.get(key)
        if s is None:
            s = (scales * layer_scale).to(d.dtype).view(-1, *([1] * (d.dim() - 1)))
            self._scale_cache[key] = s
        return s


_ACTIVE: contextvars.ContextVar[RowMix | None] = contextvars.ContextVar("latentd_lora_mix", default=None)


@contextlib.contextmanager
def active(mix: RowMix | None):
    """Apply `mix` to every attached layer called inside the block (None or empty: no adapters)."""
    token = _ACTIVE.set(mix if mix else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current() -> RowMix | None:
    return _ACTIVE.get()


def apply(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out plus the active adapters' deltas for this layer (for layers computed without calling
    the module, like a 1x1 conv on tokens)."""
    mix = _ACTIVE.get()
    return out if mix is None else mix.apply(module, x, out)


def _hook(module, args, out):
    mix = _ACTIVE.get()
    return None if mix is None else mix.apply(module, args[0], out)


def attach(root: nn.Module, component: str) -> set[str]:
    """Install the per-row hook on every Linear/Conv2d of `root` (once); returns the layer keys."""
    keys = set()
    for name, m in root.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            key = f"{component}:{name}"
            if getattr(m, KEY_ATTR, None) != key:
                setattr(m, KEY_ATTR, key)
                m.register_forward_hook(_hook)
            keys.add(key)
    return keys


def text_mix(mix: RowAdapters) -> RowAdapters:
    """The part of a row's adapters that changes its text encoding (scale 0 changes nothing)."""
    return tuple((a, s) for a, s in mix if s != 0.0 and a.touches_text)


def mix_key(mix: RowAdapters) -> tuple:
    return tuple((a.name, float(s)) for a, s in mix)


def layer_shapes(root: nn.Module, component: str) -> dict[str, tuple[int, ...]]:
    """Weight shape of every adaptable layer, by key (to check an adapter against a model)."""
    return {f"{component}:{name}": tuple(m.weight.shape) for name, m in root.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}
