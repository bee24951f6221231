"""The denoising U-Net eps_theta(x_t, t, c) of latent diffusion (Rombach et al. 2022, §3.3).

forward() is an explicit skip stack: every block has the signature (x, emb, context, skips);
down blocks push their outputs onto `skips`, up blocks pop them and concatenate. SDXL (Podell et
al. 2023, §2.2) adds to the time embedding an embedding of its added conditioning (`added`: the
pooled text embedding and the size/crop micro-conditioning), and varies the transformer depth per
level. Module names are
diffusers' (down_blocks.0.resnets.0.conv1, ...), so a diffusers state dict loads strictly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentd.model.attention import SpatialTransformer
from latentd.model.config import UNetConfig
from latentd.model.resnet import Downsample, ResnetBlock, Upsample


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim).

    The positional encoding of Vaswani et al. 2017 (§3.5) applied to the diffusion step, as in
    Ho et al. 2020 (App. B): frequencies max_period^(-i / (dim/2 - shift)).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - shift))                   # (dim/2,)
    # sin/cos run on (B, W) with W a multiple of 32, then cut back to dim/2: PyTorch's CPU
    # elementwise kernels finish a tensor's last numel % 32 elements with a scalar function that
    # differs from the SIMD one in the last ulp, so with an odd row count and a narrow embedding
    # a row's values would depend on how many rows share the call (batch invariance).
    freqs = F.pad(freqs, (0, -half % 32))                          # (W,)
    args = t[:, None].float() * freqs[None, :]                     # (B, W)
    sin, cos = torch.sin(args)[:, :half], torch.cos(args)[:, :half]   # (B, dim/2)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb                  # (B, dim)


class TimestepMLP(nn.Module):
    """Linear-SiLU-Linear on the sinusoidal embedding: (B, C0) -> (B, 4*C0)."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, out)
        self.linear_2 = nn.Linear(out, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _transformer(cfg: UNetConfig, channels: int, heads: int, level: int) -> SpatialTransformer:
    return SpatialTransformer(channels, heads, cfg.cross_attention_dim, cfg.norm_num_groups,
                              cfg.transformer_layers[level], cfg.use_linear_projection, cfg.dropout)


def _resnet(cfg: UNetConfig, in_ch: int, out_ch: int) -> ResnetBlock:
    return ResnetBlock(in_ch, out_ch, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout)


class DownBlock(nn.Module):
    """`layers` ResNet(+transformer) pairs, then an optional stride-2 downsample; pushes each output."""

    def __init__(self, cfg: UNetConfig, level: int, in_ch: int, out_ch: int, down: bool):
        super().__init__()
        n, heads = cfg.layers_per_block, cfg.num_heads[level]
        self.resnets = nn.ModuleList(_resnet(cfg, in_ch if i == 0 else out_ch, out_ch) for i in range(n))
        self.attentions = (nn.ModuleList(_transformer(cfg, out_ch, heads, level) for _ in range(n))
                           if cfg.down_attention[level] else None)
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if down else None

    def forward(self, x, emb, context, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)                               # (B, C, h/2, w/2)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """ResNet, transformer, ResNet at the lowest resolution."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        ch = cfg.block_out_channels[-1]
        self.resnets = nn.ModuleList([_resnet(cfg, ch, ch), _resnet(cfg, ch, ch)])
        self.attentions = nn.ModuleList([_transformer(cfg, ch, cfg.num_heads[-1], -1)])

    def forward(self, x, emb, context, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


class UpBlock(nn.Module):
    """`layers + 1` ResNet(+transformer) pairs, each on [x, popped skip]; then an optional upsample."""

    def __init__(self, cfg: UNetConfig, level: int, prev_ch: int, out_ch: int, skip_chs: list[int], up: bool):
        super().__init__()
        ins = [prev_ch] + [out_ch] * (len(skip_chs) - 1)
        self.resnets = nn.ModuleList(_resnet(cfg, i + s, out_ch) for i, s in zip(ins, skip_chs))
        self.attentions = (nn.ModuleList(_transformer(cfg, out_ch, cfg.num_heads[level], level) for _ in skip_chs)
                           if cfg.down_attention[level] else None)
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if up else None

    def forward(self, x, emb, context, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb)      # (B, C + C_skip, h, w) -> (B, C, h, w)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, skips[-1].shape[-2:])          # to the next skip's size
        return x


def _checkpointed(block, x, emb, context, skips):
    """Run a block under activation checkpointing; the backward pass re-runs it, so the block
    works on a private copy of the skip stack and the new stack is returned."""
    def run(x, emb, context, *stack):
        stack = list(stack)
        return (block(x, emb, context, stack), *stack)
    out = checkpoint(run, x, emb, context, *skips, use_reentrant=False)
    return out[0], list(out[1:])


class UNet(nn.Module):
    """eps_theta(x, t, context[, added]): (B, C, h, w), (B,), (B, L, D) -> (B, C, h, w).

    added (SDXL, addition_embed_type "text_time"): {"text_embeds": (B, P) pooled text embedding,
    "time_ids": (B, K) micro-conditioning numbers}, diffusers' added_cond_kwargs."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        chs, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.time_embedding = TimestepMLP(chs[0], cfg.time_embed_dim)
        # diffusers' add_time_proj is the parameter-free sinusoidal embedding (timestep_embedding)
        self.add_embedding = (TimestepMLP(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
                              if cfg.addition_embed_type == "text_time" else None)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)

        self.down_blocks = nn.ModuleList()
        skip_chs = [chs[0]]                          # channels of every tensor pushed on the skip stack
        for i in range(n):
            in_ch = chs[max(i - 1, 0)]
            last = i == n - 1
            self.down_blocks.append(DownBlock(cfg, i, in_ch, chs[i], not last))
            skip_chs += [chs[i]] * (cfg.layers_per_block + (0 if last else 1))
        self.mid_block = MidBlock(cfg)

        self.up_blocks = nn.ModuleList()
        prev = chs[-1]
        for i in range(n):
            level = n - 1 - i
            take = [skip_chs.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(cfg, level, prev, chs[level], take, up=i < n - 1))
            prev = chs[level]

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        # x: (B, 4, h, w) noisy latent z_t; t: (B,) per-sample timesteps; context: (B, 77, D) text
        emb = self.embed(x, t, added)                               # (B, 4*C0)
        context = context.to(x.dtype)

        x = self.conv_in(x)                                         # (B, C0, h, w)
        skips = [x]
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, skips = _checkpointed(block, x, emb, context, skips)
            else:
                x = block(x, emb, context, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x))).contiguous()   # (B, 4, h, w)

    def embed(self, x: torch.Tensor, t, added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The time embedding (plus SDXL's added embedding) of every row: (B, 4*C0)."""
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        cfg = self.config
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(emb.to(x.dtype))                  # (B, 4*C0)
        if self.add_embedding is not None:
            emb = emb + self._added_embedding(added, x.shape[0], emb.dtype)
        return emb

    def _added_embedding(self, added: dict[str, torch.Tensor] | None, b: int, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's added embedding (Podell et al. 2023, §2.2): every micro-conditioning number gets
        the sinusoidal embedding of a timestep (Fourier features), concatenated with the pooled
        text embedding and mapped by an MLP to the time embedding's width: (B, 4*C0)."""
        if added is None or "text_embeds" not in added or "time_ids" not in added:
            raise ValueError("this U-Net (addition_embed_type 'text_time') needs added conditioning: "
                             "{'text_embeds': (B, P), 'time_ids': (B, K)}")
        cfg = self.config
        ids = added["time_ids"]                                      # (B, K)
        fourier = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift).reshape(b, -1)   # (B, K * d)
        y = torch.cat([added["text_embeds"], fourier], dim=-1)       # (B, P + K * d)
        return self.add_embedding(y.to(dtype))                       # (B, 4*C0)
