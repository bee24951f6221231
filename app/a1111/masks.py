"""img2img inputs as A1111 reads them, made into what latentd's edits take (Pillow only).

- base64 with or without a `data:` URL prefix (whitespace allowed); anything else is a 422.
- The mask: white = repaint; an RGBA mask with transparency is read by its alpha (opaque =
  repaint, as A1111 reads one). `mask_round` thresholds it at 128, `inpainting_mask_invert` flips
  it, `mask_blur` (or mask_blur_x / mask_blur_y) blurs it with a Gaussian of that radius.
- inpainting_fill 0 ("fill"): the masked region of the init image is replaced by the colours
  around it, blurred (progressively finer Gaussian averages of the kept pixels), before it is
  encoded; 1 ("original"): the init image as it is (latentd's own inpainting).
- inpaint_full_res ("only masked"): the masked region is inpainted at the output size and pasted
  back (only_masked.py).
The results go to admission as PNG bytes; it decodes and bounds them as for /v1/images/edits.
"""
from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, ImageFilter, ImageOps

from latentd.app.a1111 import only_masked
from latentd.app.errors import ApiError
from latentd.model.edit_inputs import open_image
from latentd.model.errors import InvalidRequest

FILL_RADII = (128, 32, 8, 2)      # coarse to fine: near pixels win where there are some
MAX_BLUR = 64
MAX_PADDING = 256      # inpaint_full_res_padding, pixels around the masked region


def b64_bytes(value: str, field: str) -> bytes:
    """An image sent as base64 (optionally a data: URL): its bytes, or a 422 naming `field`."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        data = b""
    if not data:
        raise ApiError(422, "invalid_value", f"{field}: not valid base64 image data", field,
                       "a base64 PNG, JPEG or WebP file (a data: URL is fine)")
    return data


def _open(data: bytes, field: str, max_pixels: int) -> Image.Image:
    try:
        return open_image(data, field, max_pixels)
    except InvalidRequest as e:
        raise ApiError(422, "invalid_value", f"{field}: {e.message}", field, e.allowed) from None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def mask_l(mask: Image.Image, size: tuple[int, int], round_: bool, invert: bool,
           blur: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """(the mask to send, the unblurred one), both L with 255 = repaint, at `size`."""
    if "A" in mask.getbands() and mask.getchannel("A").getextrema() != (255, 255):
        m = mask.getchannel("A")
    else:
        m = mask.convert("L")
    if m.size != size:
        m = m.resize(size, Image.Resampling.LANCZOS)
    if round_:
        m = m.point(lambda v: 255 if v > 128 else 0)
    if invert:
        m = ImageOps.invert(m)
    sharp = m
    if blur[0] > 0 or blur[1] > 0:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    return m, sharp


def fill(image: Image.Image, repaint: Image.Image) -> Image.Image:
    """`image` with the region `repaint` marks (L, 255) replaced by the blurred colours around it."""
    keep = ImageOps.invert(repaint.point(lambda v: 255 if v > 128 else 0))
    rgba = image.convert("RGB")
    rgba.putalpha(keep)
    premultiplied = rgba.convert("RGBa")        # blurring premultiplied colour averages only kept pixels
    canvas = Image.new("RGBA", image.size, (127, 127, 127, 255))
    for radius in FILL_RADII:
        canvas.alpha_composite(premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA"))
    canvas.paste(image.convert("RGB"), mask=keep)
    return canvas.convert("RGB")


def edit_inputs(body, max_pixels: int, size: tuple[int, int] | None = None):
    """(init image PNG, mask PNG or None, only_masked.Paste or None) from an img2img body
    (translate.py has checked the switches). `size`: the output size (None: the image's), which
    "inpaint only masked" crops to. CPU work: call it in a worker thread."""
    image = _open(b64_bytes(body.init_images[0], "init_images"), "init_images", max_pixels).convert("RGB")
    if body.mask is None:
        return _png(image), None, None
    raw = _open(b64_bytes(body.mask, "mask"), "mask", max_pixels)
    blur = (body.mask_blur, body.mask_blur) if body.mask_blur is not None else (body.mask_blur_x, body.mask_blur_y)
    if not all(0 <= b <= MAX_BLUR for b in blur):
        raise ApiError(422, "invalid_value", f"mask_blur: must be between 0 and {MAX_BLUR}, got {blur}",
                       "mask_blur", {"min": 0, "max": MAX_BLUR})
    mask, sharp = mask_l(raw, image.size, body.mask_round, bool(body.inpainting_mask_invert), blur)
    if body.inpainting_fill == 0:
        image = fill(image, sharp)
    if not body.inpaint_full_res:
        return _png(image), _png(mask), None
    if not 0 <= body.inpaint_full_res_padding <= MAX_PADDING:
        raise ApiError(422, "invalid_value", f"inpaint_full_res_padding: must be between 0 and {MAX_PADDING}, "
                       f"got {body.inpaint_full_res_padding}", "inpaint_full_res_padding",
                       {"min": 0, "max": MAX_PADDING})
    image, mask, how = only_masked.crop(image, mask, sharp, size or image.size, body.inpaint_full_res_padding)
    return _png(image), _png(mask), how
