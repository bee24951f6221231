"""PNG encoding with the generation parameters in text chunks (never the owner or any key)."""
from __future__ import annotations

import io
import json

from PIL.PngImagePlugin import PngInfo


def encode_png(image, params: dict, seed: int, model: str) -> bytes:
    """`parameters` in the A1111 style that image tools read, plus `latentd` as JSON.
    `params` is JobSpec.params() (no owner); the per-image seed replaces the job's."""
    p = dict(params, seed=seed, model=model, width=image.width, height=image.height)
    p.pop("n", None)
    text = p["prompt"]
    if p.get("negative_prompt"):
        text += f"\nNegative prompt: {p['negative_prompt']}"
    text += (f"\nSteps: {p['steps']}, Sampler: {p['sampler']}{' Karras' if p.get('karras') else ''}, "
             f"CFG scale: {p['guidance_scale']}, Seed: {seed}, Size: {image.width}x{image.height}, "
             f"Model: {model}")
    info = PngInfo()
    info.add_text("parameters", text)
    info.add_text("latentd", json.dumps(p, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()
