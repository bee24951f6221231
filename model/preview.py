"""Cheap previews: the sampler's current x0 estimate through a per-model latent -> RGB linear map.

A full VAE decode per preview would cost about as much as a U-Net step; a 1x1 linear map of the
latent channels to RGB costs nothing, and a latent cell's colour is close to a linear function of
its channels (the observation behind the fixed "latent RGB factors" of A1111/ComfyUI previews).
Instead of a hand-tuned table per model family, the map is fitted when the model loads: a few
synthetic colour images (random colour blocks, solid colours) are VAE-encoded, decoded again, and
least squares maps each latent cell [z, 1] (C+1,) to the mean colour of the f x f decoded pixels
it covers (3,): the preview approximates what the decoder would draw from x0 (the target is the
decode, not the input, so the VAE's own reconstruction error is not fitted into the map).

Safety: a preview is at most PREVIEW_CELLS cells on its long side (the x0 estimate is averaged
down before the map), a coarse colour mosaic and never a decoded image, because the safety check
only runs on the final decode. A flagged image's previews are such mosaics and its final is black.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PREVIEW_CELLS = 16        # a preview's long side, in cells, at most
_FIT_IMAGES = 24          # synthetic images the map is fitted on
_FIT_CELLS = 8            # their size in latent cells (8 x 8 cells = 8f x 8f pixels)


@dataclass(frozen=True)
class LatentRGB:
    """rgb = weight @ z + bias per latent cell, rgb in [-1, 1]; z in the sampler's latent space
    (VAE mean x scaling_factor, shift removed): weight (3, C), bias (3,)."""

    weight: torch.Tensor
    bias: torch.Tensor

    @torch.inference_mode()
    def render(self, x0: torch.Tensor) -> np.ndarray:
        """x0 (1, C, h, w) -> uint8 (h', w', 3) with max(h', w') <= PREVIEW_CELLS."""
        h, w = int(x0.shape[-2]), int(x0.shape[-1])
        scale = min(1.0, PREVIEW_CELLS / max(h, w))
        cells = (max(1, round(h * scale)), max(1, round(w * scale)))
        z = torch.nn.functional.adaptive_avg_pool2d(x0.float(), cells)[0].cpu()     # (C, h', w')
        rgb = torch.einsum("rc,chw->hwr", self.weight, z) + self.bias              # (h', w', 3)
        return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def _synthetic_images(n: int, side: int, factor: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, side*factor, side*factor) in [-1, 1]: solid colours and 4x4 grids of random colours,
    so the fit sees every hue at several brightnesses, uniform over whole latent cells."""
    g = torch.Generator().manual_seed(seed)
    solid = torch.tensor([[-1, -1, -1], [1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1],
                          [1, 1, -1], [-1, 1, 1], [1, -1, 1], [0, 0, 0]], dtype=torch.float32)
    out = []
    for i in range(n):
        if i < len(solid):
            grid = solid[i].view(3, 1, 1).expand(3, 4, 4)
        else:
            grid = torch.rand((3, 4, 4), generator=g) * 2 - 1
        cells = grid.repeat_interleave(side // 4, 1).repeat_interleave(side // 4, 2)   # (3, side, side)
        out.append(cells.repeat_interleave(factor, 1).repeat_interleave(factor, 2))
    return torch.stack(out)


@torch.inference_mode()
def fit_latent_rgb(vae, scaling_factor: float, shift_factor: float | None, factor: int,
                   device="cpu") -> LatentRGB:
    """Least squares from VAE latents of synthetic colour images to the per-cell mean colours of
    their decodes. vae: model.vae.AutoencoderKL; factor: pixels per latent cell (8 for SD)."""
    dtype = next(vae.parameters()).dtype
    x = _synthetic_images(_FIT_IMAGES, _FIT_CELLS, factor)                   # (N, 3, 8f, 8f)
    mean, _ = vae.encode(x.to(device, dtype))                                 # (N, C, 8, 8)
    decoded = vae.decode(mean).float().clamp(-1, 1).cpu()                     # (N, 3, 8f, 8f)
    z = mean.float().cpu()
    if shift_factor is not None:
        z = z - shift_factor
    z = z * scaling_factor                                                    # the sampler's space
    target = torch.nn.functional.avg_pool2d(decoded, factor)                  # (N, 3, 8, 8)
    c = z.shape[1]
    a = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, c), torch.ones(z[:, :1].numel(), 1)], 1)
    b = target.permute(0, 2, 3, 1).reshape(-1, 3)                             # (N*64, 3)
    sol = torch.linalg.lstsq(a.double(), b.double()).solution.float()        # (C+1, 3)
    return LatentRGB(weight=sol[:c].T.contiguous(), bias=sol[c].contiguous())


def fit_for(pipe) -> LatentRGB:
    """The map for a loaded model.pipeline.Pipeline."""
    return fit_latent_rgb(pipe.vae, pipe.latent_scale, pipe.latent_shift, pipe.info.vae_factor,
                          pipe.device)
