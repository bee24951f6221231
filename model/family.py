"""Model families, torch-free (the API reads them through model/info.py).

A family is read from the U-Net's config: SDXL's U-Net has addition_embed_type "text_time" (its
added size/crop and pooled-text conditioning, Podell et al. 2023, §2.2); everything else latentd
loads is Stable Diffusion 1.x/2.x. model/conditioner.py turns a family into its parts.
"""
from __future__ import annotations

FAMILIES = ("sd", "sdxl")

# SDXL was trained on aspect-ratio buckets of about 1024^2 pixels (Podell et al. 2023, §2.3,
# App. I); these are the buckets Stability recommends for generation, as (width, height).
SDXL_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
              (1344, 768), (768, 1344), (1536, 640), (640, 1536))
SDXL_NATIVE = 1024


def family_of(unet_config: dict) -> str:
    """"sdxl" for a U-Net with SDXL's added conditioning, else "sd"."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"


def default_sizes(family: str, native: int) -> tuple[tuple[int, int], ...]:
    """The sizes a model allows when its latentd.json does not say: SDXL at its native 1024 gets
    its buckets; anything else () (any multiple of the size step within the pixel bounds)."""
    return SDXL_SIZES if family == "sdxl" and native == SDXL_NATIVE else ()
