"""Image-to-image and inpainting as per-request tensors, so edits share U-Net calls with everything.

An edit is a text-to-image request with
  - a different start: the init image's latent x0 = scale * z, z ~ q(z | image) (Rombach et al.
    2022), noised to the first step it runs (SDEdit, Meng et al. 2022): x = ka x0 + kb eps, with
    (ka, kb) = Plan.noise_coeffs(0);
  - for inpainting with a text-to-image U-Net, a blend after every step (the region outside the
    mask is replaced by x0 noised to the next step's level, diffusers' StableDiffusionInpaintPipeline
    for 4-channel U-Nets):  x <- (1 - m) (ka' x0 + kb' eps) + m x;
  - for an inpainting U-Net (in_channels = 2C + 1), extra input channels [m, E(masked image)] next
    to the latent (Stable Diffusion inpainting). Text-to-image and img2img requests on such a model
    get m = 1 and the latent of an all-masked (mid-grey) image, i.e. "repaint everything".

The generator is consumed in diffusers' order: E(image) sample (img2img; inpainting when the U-Net
has 4 channels or strength < 1), the initial noise, then E(masked image) sample (inpainting).
Masks: 1 = repaint; binarised at 0.5 and resized to the latent grid by nearest neighbour.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps


@dataclass(eq=False)
class EditState:
    """Per-request edit tensors (all float32 on the pipeline's device)."""

    image_latent: torch.Tensor | None = None    # (1, C, h, w) scaled x0 of the init image (blend)
    noise: torch.Tensor | None = None           # (1, C, h, w) the initial noise, reused by the blend
    mask: torch.Tensor | None = None            # (1, 1, h, w) 1 = repaint (blend), None: no blend
    extra: torch.Tensor | None = None           # (1, C + 1, h, w) [mask, masked-image latent] (9-ch U-Net)


def image_tensor(img: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL -> (1, 3, H, W) float32 in [-1, 1], resized (Lanczos) to width x height if needed, as
    diffusers' VaeImageProcessor does."""
    img = img.convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.Resampling.LANCZOS)
    a = np.asarray(img).astype(np.float32) / 255.0                     # (H, W, 3)
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Grayscale mask (white = repaint) -> (1, 1, H, W) float32 in {0, 1}, binarised at 0.5."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.Resampling.LANCZOS)
    a = np.asarray(mask).astype(np.float32) / 255.0
    return torch.from_numpy((a >= 0.5).astype(np.float32))[None, None]


class Encoder:
    """VAE encoding for edits: z = scale * (mean + std * eps) (or the mean, with no generator),
    one image at a time so a request's latent never depends on its batch-mates."""

    def __init__(self, vae, latent_scale: float, latent_shift, device, dtype):
        self.vae, self.scale, self.shift = vae, latent_scale, latent_shift
        self.device, self.dtype = device, dtype
        self._grey: dict[tuple[int, int], torch.Tensor] = {}

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> (1, C, H/f, W/f) float32 scaled latent."""
        mean, logvar = self.vae.encode(x.to(self.device, self.dtype))
        mean, logvar = mean.float(), logvar.float()
        if generator is not None:     # diffusers' DiagonalGaussianDistribution.sample
            eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(self.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        else:
            z = mean
        if self.shift is not None:
            z = z - self.shift
        return self.scale * z

    def grey_latent(self, width: int, height: int) -> torch.Tensor:
        """Latent of an all-masked image (zeros in [-1, 1]), by the posterior mean; cached per size."""
        key = (width, height)
        if key not in self._grey:
            self._grey[key] = self.encode(torch.zeros(1, 3, height, width), None)
        return self._grey[key]


def start_edit(enc: Encoder, plan, req, width: int, height: int, shape: tuple, generator,
               inpaint_unet: bool, device) -> tuple[torch.Tensor, EditState | None]:
    """(initial latent (1, C, h, w) in the sampler's space, EditState or None) for `req`, drawing
    from `generator` in diffusers' order (see the module docstring)."""
    image, mask = req.init_image, req.mask
    if image is None and not inpaint_unet:                   # text-to-image: x = init_sigma eps
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return (noise * plan.init_sigma).to(device), None
    if image is None:                                        # text-to-image on an inpainting U-Net
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        m = torch.ones((1, 1) + tuple(shape[-2:]), device=device)
        return noise * plan.init_sigma, EditState(extra=torch.cat([m, enc.grey_latent(width, height)], 1))
    x_img = image_tensor(image, width, height)               # (1, 3, H, W)
    if mask is None and not inpaint_unet:                    # img2img
        x0 = enc.encode(x_img, generator)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        ka, kb = plan.noise_coeffs(0)
        return _noised(x0, noise, ka, kb), None
    # inpainting (img2img on an inpainting U-Net = inpainting with everything masked)
    m_px = mask_tensor(mask, width, height) if mask is not None else torch.ones(1, 1, height, width)
    full = req.strength is None or req.strength >= 1.0       # diffusers: pure noise at strength 1
    x0 = enc.encode(x_img, generator) if (not inpaint_unet or not full) else None
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    if full:
        x = noise * plan.init_sigma
    else:
        ka, kb = plan.noise_coeffs(0)
        x = _noised(x0, noise, ka, kb)
    m = F.interpolate(m_px, size=tuple(shape[-2:])).to(device)    # (1, 1, h, w), nearest
    if inpaint_unet:
        masked = enc.encode(x_img * (m_px < 0.5), generator)       # (1, C, h, w)
        return x, EditState(extra=torch.cat([m, masked], 1))
    # the masked image's latent is unused with a 4-channel U-Net, but diffusers draws its sample:
    # draw the same numbers so the ancestral noise that follows matches
    torch.randn(shape, generator=generator, dtype=torch.float32)
    return x, EditState(image_latent=x0, noise=noise, mask=m)


def _noised(x0: torch.Tensor, noise: torch.Tensor, ka: float, kb: float) -> torch.Tensor:
    """x0 noised to a level in the sampler's space: ka x0 + kb eps (float32 coefficients)."""
    return torch.tensor(ka, dtype=torch.float32) * x0 + torch.tensor(kb, dtype=torch.float32) * noise


def blend(x: torch.Tensor, edit: EditState, ka: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """Inpainting with a text-to-image U-Net, after a step: keep the init image outside the mask,
    noised to the next step's level. x: (1, C, h, w); ka, kb: (1, 1, 1, 1) float32."""
    proper = ka * edit.image_latent + kb * edit.noise
    return (1 - edit.mask) * proper + edit.mask * x


def overlay(image: Image.Image, init: Image.Image, mask: Image.Image) -> Image.Image:
    """Inpainting's output with the init image's own pixels outside the mask (A1111's overlay,
    diffusers' VaeImageProcessor.apply_overlay): the VAE decoder mixes the whole latent (its
    mid-block attention is global), so keeping the unmasked latents alone does not keep those
    pixels. `mask` (L, white = repaint) is used as uploaded, so a soft edge blends."""
    size = image.size
    init = init.convert("RGB")
    mask = mask.convert("L")
    if init.size != size:
        init = init.resize(size, resample=Image.Resampling.LANCZOS)
    if mask.size != size:
        mask = mask.resize(size, resample=Image.Resampling.LANCZOS)
    out = image.copy()
    out.paste(init, mask=ImageOps.invert(mask))
    return out
