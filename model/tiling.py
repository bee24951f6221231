"""VAE decode in overlapping tiles, so that large images decode in bounded memory.

The decoder's activations at full resolution dominate its memory (SD's VAE: 128-512 channels at
H x W; about 10 GB in float32 for one 2048x2048 image). Decoding latent tiles of `tile` x `tile`
cells bounds that by the tile's size. Neighbouring tiles overlap by `overlap` cells and are blended
with linear ramps across the overlap, so seams do not show; the result differs from a whole decode
only where the decoder looks beyond a tile (its receptive field, GroupNorm statistics and the
mid-block attention are per tile), which is what tiled decoders accept (as diffusers'
`enable_vae_tiling`, and MultiDiffusion, Bar-Tal et al. 2023, for the blending).

Slicing (one image per decode call) is Pipeline._decode's; tiling splits one image.
"""
from __future__ import annotations

import torch

DEFAULT_TILE = 64          # latent cells per side (512 px for SD): larger latents are tiled
DEFAULT_OVERLAP = 16       # latent cells shared by neighbouring tiles


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` cells covering [0, n) with at least `overlap` shared."""
    if n <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile]


def _ramp(length: int, fade_in: int, fade_out: int, device) -> torch.Tensor:
    """(length,) weights: rising linearly over the first fade_in samples, falling over the last
    fade_out, 1 between; strictly positive, so every pixel has weight."""
    i = torch.arange(length, dtype=torch.float32, device=device) + 0.5
    w = torch.ones(length, dtype=torch.float32, device=device)
    if fade_in:
        w = torch.minimum(w, i / fade_in)
    if fade_out:
        w = torch.minimum(w, (length - i) / fade_out)
    return w


def decode_tiled(decode, z: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                 factor: int | None = None) -> torch.Tensor:
    """decode: (B, C, th, tw) latent -> (B, 3, th*f, tw*f) image. z: (B, C, h, w) -> (B, 3, h*f, w*f)
    float32, decoded tile by tile and blended over the overlaps."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    b, _, h, w = z.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = weight = None
    for y in ys:
        for x in xs:
            part = decode(z[:, :, y:y + tile, x:x + tile]).float()         # (B, 3, th*f, tw*f)
            f = factor or part.shape[-2] // min(tile, h)
            if out is None:
                out = torch.zeros((b, part.shape[1], h * f, w * f), dtype=torch.float32, device=part.device)
                weight = torch.zeros((1, 1, h * f, w * f), dtype=torch.float32, device=part.device)
            ph, pw = part.shape[-2:]
            # fade only on sides that meet another tile; the others touch the image border
            wy = _ramp(ph, overlap * f if y > 0 else 0, overlap * f if y + tile < h else 0, part.device)
            wx = _ramp(pw, overlap * f if x > 0 else 0, overlap * f if x + tile < w else 0, part.device)
            m = (wy[:, None] * wx[None, :])[None, None]                     # (1, 1, ph, pw)
            out[:, :, y * f:y * f + ph, x * f:x * f + pw] += part * m
            weight[:, :, y * f:y * f + ph, x * f:x * f + pw] += m
    return out / weight


def decode(vae, z: torch.Tensor, tile: int | None = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """vae.decode(z), tiled when the latent is larger than `tile` on a side (tile None: never).
    z: (B, C, h, w) in the VAE's dtype -> (B, 3, H, W) float32."""
    if tile is None or max(z.shape[-2:]) <= tile:
        return vae.decode(z).float()
    return decode_tiled(vae.decode, z, tile, min(overlap, tile - 1))
