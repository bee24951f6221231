"""Uploaded init images and masks -> checked PIL images (torch-free: the API and the CLI use it).

Every failure is an InvalidRequest naming the field (`image` or `mask`): bytes that are not a
PNG/JPEG/WebP, a truncated or corrupt file, a decompression bomb, more pixels than allowed.
Pillow's own bomb guard is set to the same cap (Image.MAX_IMAGE_PIXELS; its warning zone is an
error here), and the header's size is checked before any pixel is decoded.

Masks: white = repaint. A mask with transparency is read as OpenAI's edits read it: transparent
(alpha 0) = repaint, opaque = keep (L = 255 - alpha); any other mask by its luminance.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from latentd.model.errors import InvalidRequest

FORMATS = ("PNG", "JPEG", "WEBP")


def open_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decode `data` fully (first frame), EXIF orientation applied; InvalidRequest(field) else."""
    if not data:
        raise InvalidRequest(field, "is empty; send a PNG, JPEG or WebP file", "a PNG, JPEG or WebP file")
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidRequest(field, f"{w}x{h} = {w * h} pixels exceeds the maximum of "
                                            f"{max_pixels} pixels", {"max_pixels": max_pixels})
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):    # CMYK, 16-bit, ...
                img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(field, f"too many pixels (decompression bomb guard: at most {max_pixels})",
                             {"max_pixels": max_pixels}) from None
    except UnidentifiedImageError:
        raise InvalidRequest(field, "is not an image Pillow can read as PNG, JPEG or WebP",
                             list(f.lower() for f in FORMATS)) from None
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, struct.error...: a bad file
        raise InvalidRequest(field, f"cannot be decoded: truncated, corrupt or an unsupported "
                                    f"pixel format ({type(e).__name__})",
                             "a complete PNG, JPEG or WebP file") from None
    return img


def mask_to_l(img: Image.Image) -> Image.Image:
    """A mask upload -> mode L, 255 = repaint (see the module docstring)."""
    if "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return ImageOps.invert(alpha)
    return img.convert("L")


def normalised_png(img: Image.Image, width: int, height: int, mode: str) -> bytes:
    """`img` in `mode` (RGB image / L mask), resized (Lanczos, as the engine would) to width x
    height, as PNG bytes with no metadata: what an edit job stores."""
    img = img.convert(mode)
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
