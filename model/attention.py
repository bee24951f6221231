"""Attention layers of the U-Net and the VAE (Vaswani et al. 2017; Rombach et al. 2022, §3.3).

Module names follow diffusers (to_q/to_k/to_v/to_out.0, ff.net.0.proj, ...) so a diffusers state
dict loads with a strict load_state_dict and no renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentd.model import lora_runtime
from latentd.model.layout import memory_format_of as _layout


class Attention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, Eq. 1).

    Queries come from x (B, N, dim); keys and values from context (B, L, context_dim), or from x
    itself (self-attention) when context is None.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, dim = x.shape
        h = self.heads
        q = self.to_q(x).view(b, n, h, dim // h).transpose(1, 2)          # (B, heads, N, d)
        k = self.to_k(ctx).view(b, -1, h, dim // h).transpose(1, 2)       # (B, heads, L, d)
        v = self.to_v(ctx).view(b, -1, h, dim // h).transpose(1, 2)       # (B, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v)                      # (B, heads, N, d)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, dim))      # (B, N, dim)


class GEGLU(nn.Module):
    """Gated GELU projection: a * GELU(g) with [a, g] = x W (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise feed-forward with a GEGLU, inner width 4 * dim (net.0.proj, net.2)."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text, feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x               # (B, HW, C)
        x = self.attn2(self.norm2(x), context) + x      # queries: pixels, keys/values: tokens
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on context (Rombach et al. §3.3).

    diffusers calls it Transformer2DModel. SD 1.x projects in/out with 1x1 convolutions, SD 2.x
    with Linear layers (use_linear_projection); both are the same map, stored differently.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, layers: int = 1,
                 linear: bool = False, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim, dropout) for _ in range(layers))
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c)   # (B, HW, C); free if channels_last
        h = _pointwise(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = _pointwise(self.proj_out, h).reshape(b, hgt, wid, c).permute(0, 3, 1, 2)   # (B, C, H, W)
        return h.contiguous(memory_format=_layout(x)) + x    # keep the input's layout


def _pointwise(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A Linear, or a 1x1 Conv2d applied as the same matrix product on (B, HW, C) tokens (one
    matmul instead of a convolution and two layout copies; the weights keep their stored shape).
    The conv's module is not called, so its LoRA deltas are added here (model/lora_runtime.py)."""
    if isinstance(layer, nn.Conv2d):
        out = F.linear(h, layer.weight.flatten(1), layer.bias)    # (C_out, C_in, 1, 1) -> (C_out, C_in)
        return lora_runtime.apply(layer, h, out)
    return layer(h)


class VAEAttention(nn.Module):
    """Single-head self-attention over the pixels of the VAE's lowest-resolution feature map."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)                   # (B, HW, C)
        q, k, v = (lin(h).unsqueeze(1) for lin in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)               # (B, HW, C)
        h = self.to_out[0](h).reshape(b, hgt, wid, c).permute(0, 3, 1, 2)   # (B, C, H, W)
        return h.contiguous(memory_format=_layout(x)) + x
