"""Result encoding (PNG, JPEG, WebP) with the generation parameters in the file's metadata, never
the owner or any key.

PNG: text chunks `parameters` (the A1111 style that image tools read) and `latentd` (JSON).
JPEG and WebP: the same `parameters` text in EXIF UserComment (where A1111 writes it); JPEG also
carries the JSON in its comment (COM) segment. output_compression is the JPEG/WebP quality
(0-100, OpenAI's default 100); PNG is lossless and ignores it.
"""
from __future__ import annotations

import io
import json

from latentd.jobs.request_loras import as_tags

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_QUALITY = 100
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def _parameters(image, params: dict, seed: int, model: str) -> tuple[str, dict]:
    """(A1111-style text, JSON dict) of one image. `params` is JobSpec.params() (no owner); the
    per-image seed replaces the job's."""
    p = dict(params, seed=seed, model=model, width=image.width, height=image.height)
    p.pop("n", None)
    text = p["prompt"] + as_tags(p.get("loras"))
    if p.get("negative_prompt"):
        text += f"\nNegative prompt: {p['negative_prompt']}"
    text += (f"\nSteps: {p['steps']}, Sampler: {p['sampler']}{' Karras' if p.get('karras') else ''}, "
             f"CFG scale: {p['guidance_scale']}, Seed: {seed}, Size: {image.width}x{image.height}, "
             f"Model: {model}")
    if p.get("strength") is not None:
        text += f", Denoising strength: {p['strength']}"
    return text, p


def encode_image(image, params: dict, seed: int, model: str, fmt: str = "png",
                 compression: int | None = None) -> bytes:
    """The image as `fmt` (png | jpeg | webp) bytes with its parameters in the metadata."""
    # Pillow here, not at import: the stores and the API import this module only to name formats
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    text, p = _parameters(image, params, seed, model)
    buf = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", text)
        info.add_text("latentd", json.dumps(p, sort_keys=True))
        image.save(buf, format="PNG", pnginfo=info, compress_level=4)
        return buf.getvalue()
    if fmt not in MEDIA_TYPES:
        raise ValueError(f"unknown output format {fmt!r}")
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\x00" + text.encode("utf-16-be")
    quality = DEFAULT_QUALITY if compression is None else int(compression)
    extra = {"comment": json.dumps(p, sort_keys=True).encode()} if fmt == "jpeg" else {}
    image.convert("RGB").save(buf, format=fmt.upper(), quality=quality, exif=exif.tobytes(), **extra)
    return buf.getvalue()


def format_of(data: bytes) -> str | None:
    """The output format (a MEDIA_TYPES key) of encoded bytes, from their signature; None for
    anything else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def extension(data: bytes) -> str:
    """The extension (the format's name) a store gives encoded bytes; only images are stored."""
    fmt = format_of(data)
    if fmt is None:
        raise ValueError("not a PNG, JPEG or WebP image")
    return fmt


def media_type(data: bytes) -> str:
    """The Content-Type of stored result bytes, from their signature."""
    return MEDIA_TYPES.get(format_of(data), "application/octet-stream")
