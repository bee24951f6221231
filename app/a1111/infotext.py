"""A1111's record of a generation: the `info` JSON string of txt2img/img2img answers, its
infotext lines (what A1111 writes into a PNG's `parameters` chunk), and reading them back
(POST /sdapi/v1/png-info reads latentd's PNG text chunks and A1111's `parameters`).
"""
from __future__ import annotations

import io
import json
import re
import time

from PIL import Image

from latentd.app.a1111.names import a1111_name
from latentd.jobs.encode import _EXIF_IFD, _USER_COMMENT
from latentd.jobs.request_loras import as_tags

VERSION = "latentd"
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def infotext(prompt: str, negative: str, steps: int, sampler: str, scheduler: str, cfg: float,
             seed: int, width: int, height: int, model: str, strength: float | None) -> str:
    """One image's infotext, in A1111's layout."""
    text = prompt + (f"\nNegative prompt: {negative}" if negative else "")
    pairs = [("Steps", steps), ("Sampler", sampler), ("Schedule type", scheduler), ("CFG scale", cfg),
             ("Seed", seed), ("Size", f"{width}x{height}"), ("Model", model)]
    if strength is not None:
        pairs.append(("Denoising strength", strength))
    pairs.append(("Version", VERSION))
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in pairs)


def info(spec, model: str, body, n_images: int) -> dict:
    """A1111's `info` (Processed.js()) of a resolved job: seeds, infotexts, the model, ..."""
    sampler, scheduler = a1111_name(spec.sampler, spec.karras)
    seeds = [spec.seed + k for k in range(n_images)]
    prompt = spec.prompt + as_tags(spec.loras)          # A1111 keeps the tags in its prompt
    texts = [infotext(prompt, spec.negative_prompt, spec.steps, sampler, scheduler,
                      spec.guidance_scale, s, spec.width, spec.height, model, spec.strength) for s in seeds]
    return {"prompt": prompt, "all_prompts": [prompt] * n_images,
            "negative_prompt": spec.negative_prompt, "all_negative_prompts": [spec.negative_prompt] * n_images,
            "seed": spec.seed, "all_seeds": seeds, "subseed": body.subseed, "all_subseeds": [body.subseed] * n_images,
            "subseed_strength": 0, "width": spec.width, "height": spec.height, "sampler_name": sampler,
            "scheduler": scheduler, "cfg_scale": spec.guidance_scale, "steps": spec.steps,
            "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": model, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": spec.strength,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
            "is_using_inpainting_conditioning": False, "version": VERSION}


def parse(text: str) -> dict:
    """An infotext -> {"Prompt", "Negative prompt", "Steps", ..., "Size-1", "Size-2"} (values as
    text, as A1111's png-info gives them)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines and _PAIR.findall(lines[-1]) and ": " in lines[-1] else ""
    body = lines[:-1] if last else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        out[key.strip()] = json.loads(value) if value.startswith('"') else value
        m = re.fullmatch(r"(\d+)x(\d+)", value)
        if m:
            out[f"{key.strip()}-1"], out[f"{key.strip()}-2"] = m.group(1), m.group(2)
    return out


def read(data: bytes) -> tuple[str, dict]:
    """(the `parameters` text, the other text chunks) of a PNG, or of a JPEG/WebP's EXIF
    UserComment (where latentd and A1111 write it)."""
    img = Image.open(io.BytesIO(data))
    items = {k: v for k, v in (img.info or {}).items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    if not text:
        comment = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
        if isinstance(comment, bytes) and comment.startswith(b"UNICODE\x00"):
            text = comment[8:].decode("utf-16-be", "replace")
        elif isinstance(comment, bytes):
            text = comment[8:].decode("utf-8", "replace")
    return text, items
