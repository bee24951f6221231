"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3.1).

E maps an image (B, 3, H, W) in [-1, 1] to a Gaussian over latents (B, 4, H/8, W/8); D maps a
latent back. The diffusion chain runs on z * scaling_factor. Names follow diffusers' AutoencoderKL.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentd.model.attention import VAEAttention
from latentd.model.config import VAEConfig
from latentd.model.resnet import Downsample, ResnetBlock, Upsample

_EPS = 1e-6


class EncoderBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, down: bool):
        super().__init__()
        g = cfg.norm_num_groups
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, g, _EPS)
                                     for i in range(cfg.layers_per_block))
        self.downsamplers = nn.ModuleList([Downsample(out_ch, pad_asymmetric=True)]) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, up: bool):
        super().__init__()
        g = cfg.norm_num_groups
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, g, _EPS)
                                     for i in range(cfg.layers_per_block + 1))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class MidBlock(nn.Module):
    """ResNet, single-head self-attention (optional), ResNet."""

    def __init__(self, cfg: VAEConfig, ch: int):
        super().__init__()
        g = cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, None, g, _EPS), ResnetBlock(ch, ch, None, g, _EPS)])
        self.attentions = nn.ModuleList([VAEAttention(ch, g)]) if cfg.mid_block_add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(EncoderBlock(cfg, chs[max(i - 1, 0)], chs[i], i < n - 1) for i in range(n))
        self.mid_block = MidBlock(cfg, chs[-1])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)                                         # (B, C0, H, W)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)                                       # (B, C_last, H/8, W/8)
        return self.conv_out(F.silu(self.conv_norm_out(x)))         # (B, 2*4, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rev, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(cfg, rev[0])
        self.up_blocks = nn.ModuleList(DecoderBlock(cfg, rev[max(i - 1, 0)], rev[i], i < n - 1) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, rev[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))                         # (B, C_last, H/8, W/8)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))         # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    """encode(x) -> (mean, logvar) of q(z|x); decode(z) -> x. Neither applies scaling_factor."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        c = 2 * cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(c, c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, 3, H, W) in [-1, 1] -> mean, logvar: (B, 4, H/8, W/8)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, 4, H/8, W/8), unscaled -> (B, 3, H, W), roughly in [-1, 1]
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Reconstruction for training: z ~ q(z|x) by reparameterisation; returns (x_rec, mean, logvar)."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator,
                                                         device=mean.device, dtype=mean.dtype)
        return self.decode(z), mean, logvar
