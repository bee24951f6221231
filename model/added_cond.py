"""Added conditioning: per-request inputs of the U-Net besides the latent, timestep and context.

SDXL's micro-conditioning (Podell et al. 2023, §2.2, addition_embed_type "text_time"): the U-Net
is told the training image's original size, the crop it was cut from and the target size,

    time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)      (1, 6)

and with the pooled text embedding they make up a row's added conditioning
{"text_embeds": (1, P), "time_ids": (1, 6)}. Defaults as diffusers' StableDiffusionXL pipelines
(text-to-image, img2img, inpainting alike): original = target = the size drawn, crop (0, 0). The
unconditional row of classifier-free guidance gets the same ids and the negative prompt's pooled
embedding.

A model whose model_index.json says requires_aesthetics_score (SDXL's refiner, §2.5) was trained
with an aesthetic score in place of the target size,

    time_ids = (orig_h, orig_w, crop_top, crop_left, score)                   (1, 5)

scored 6.0 on the conditional row and 2.5 on the unconditional one (diffusers' defaults).
Pipeline._step concatenates the rows' dicts key by key, like the context, so any mix of requests
shares one U-Net call.
"""
from __future__ import annotations

import torch

TIME_IDS = 6                      # numbers in SDXL base's micro-conditioning
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


def time_ids(model_index: dict) -> int:
    """How many micro-conditioning numbers a model takes: 5 with an aesthetic score, else 6."""
    return TIME_IDS - 1 if model_index.get("requires_aesthetics_score") else TIME_IDS


def text_time_ids(width: int, height: int, original: tuple[int, int] | None = None,
                  crop_top_left: tuple[int, int] = (0, 0),
                  target: tuple[int, int] | None = None) -> torch.Tensor:
    """(1, 6) float32 micro-conditioning; original/target as (height, width) like diffusers."""
    original = original or (height, width)
    target = target or (height, width)
    return torch.tensor([[*original, *crop_top_left, *target]], dtype=torch.float32)


def aesthetic_ids(width: int, height: int, score: float) -> torch.Tensor:
    """(1, 5) float32: original size (height, width), crop (0, 0) and an aesthetic score."""
    return torch.tensor([[height, width, 0, 0, score]], dtype=torch.float32)


class TextTime:
    """The "text_time" added conditioning part: a request's (cond, uncond) rows."""

    def __init__(self, aesthetics: bool = False):
        self.aesthetics = aesthetics              # requires_aesthetics_score: 5 ids, score last

    def rows(self, width: int, height: int, pooled: torch.Tensor, uncond_pooled: torch.Tensor,
             device, dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(cond row, uncond row): {"text_embeds": (1, P), "time_ids": (1, 6 or 5)} each, on device."""
        if self.aesthetics:
            ids = aesthetic_ids(width, height, AESTHETIC_SCORE)
            ids_u = aesthetic_ids(width, height, NEGATIVE_AESTHETIC_SCORE)
        else:
            ids = ids_u = text_time_ids(width, height)
        return ({"text_embeds": pooled.to(device, dtype), "time_ids": ids.to(device, dtype)},
                {"text_embeds": uncond_pooled.to(device, dtype), "time_ids": ids_u.to(device, dtype)})
