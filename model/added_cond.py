"""Added conditioning: per-request inputs of the U-Net besides the latent, timestep and context.

SDXL's micro-conditioning (Podell et al. 2023, §2.2, addition_embed_type "text_time"): the U-Net
is told the training image's original size, the crop it was cut from and the target size,

    time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)      (1, 6)

and with the pooled text embedding they make up a row's added conditioning
{"text_embeds": (1, P), "time_ids": (1, 6)}. Defaults as diffusers' StableDiffusionXLPipeline:
original = target = the requested size, crop (0, 0). The unconditional row of classifier-free
guidance gets the same ids and the negative prompt's pooled embedding. Pipeline._step
concatenates the rows' dicts key by key, like the context, so any mix of requests shares one
U-Net call.
"""
from __future__ import annotations

import torch

TIME_IDS = 6                      # numbers in SDXL's micro-conditioning


def text_time_ids(width: int, height: int, original: tuple[int, int] | None = None,
                  crop_top_left: tuple[int, int] = (0, 0),
                  target: tuple[int, int] | None = None) -> torch.Tensor:
    """(1, 6) float32 micro-conditioning; original/target as (height, width) like diffusers."""
    original = original or (height, width)
    target = target or (height, width)
    return torch.tensor([[*original, *crop_top_left, *target]], dtype=torch.float32)


class TextTime:
    """The "text_time" added conditioning part: a request's (cond, uncond) rows."""

    def rows(self, width: int, height: int, pooled: torch.Tensor, uncond_pooled: torch.Tensor,
             device, dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(cond row, uncond row): {"text_embeds": (1, P), "time_ids": (1, 6)} each, on device."""
        ids = text_time_ids(width, height).to(device, dtype)
        return ({"text_embeds": pooled.to(device, dtype), "time_ids": ids},
                {"text_embeds": uncond_pooled.to(device, dtype), "time_ids": ids})
