"""A1111's "inpaint only masked" (`inpaint_full_res: true`) on top of latentd's inpainting.

The region the mask covers, grown by `inpaint_full_res_padding` pixels and then to the output's
aspect ratio, is cut out of the init image (already at the output size), scaled up to the output
size and inpainted there, so a small masked area gets the model's whole resolution. The result is
scaled back into the region and pasted over the init image through the (blurred) mask; outside
the mask the init image's pixels stay as they were. Pillow only (the API never imports torch).
The job itself stores the inpainted crop; the /sdapi answer carries the pasted picture.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

Box = tuple[int, int, int, int]          # (left, top, right, bottom), right/bottom exclusive


@dataclass(frozen=True)
class Paste:
    base: Image.Image       # RGB init image at the output size: what the result is pasted into
    alpha: Image.Image      # L blurred mask at the output size, 255 = the result's pixels
    box: Box                # the region that was inpainted, in base's pixels


def region(sharp: Image.Image, pad: int) -> Box | None:
    """The masked pixels' bounding box grown by `pad` on each side, inside the image; None when
    the mask marks nothing."""
    box = sharp.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    w, h = sharp.size
    return max(box[0] - pad, 0), max(box[1] - pad, 0), min(box[2] + pad, w), min(box[3] + pad, h)


def _grow(lo: int, hi: int, want: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown evenly to `want` long (at most `limit`), shifted back inside [0, limit)."""
    want = min(max(want, hi - lo), limit)
    extra = want - (hi - lo)
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def fit_aspect(box: Box, out_w: int, out_h: int, width: int, height: int) -> Box:
    """`box` grown along its short side to the output's aspect ratio out_w / out_h (as far as the
    image allows), so scaling the crop to the output size does not distort it."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    if bw * out_h > bh * out_w:                 # wider than the output: grow the height
        y0, y1 = _grow(y0, y1, round(bw * out_h / out_w), height)
    else:
        x0, x1 = _grow(x0, x1, round(bh * out_w / out_h), width)
    return x0, y0, x1, y1


def crop(image: Image.Image, mask: Image.Image, sharp: Image.Image, size: tuple[int, int],
         pad: int) -> tuple[Image.Image, Image.Image, Paste | None]:
    """(image to inpaint, its mask, how to paste the result back) at the output `size`. An empty
    mask: the whole picture, nothing to paste."""
    image = image.convert("RGB").resize(size, Image.Resampling.LANCZOS) if image.size != size else image
    mask = mask.resize(size, Image.Resampling.LANCZOS) if mask.size != size else mask
    sharp = sharp.resize(size, Image.Resampling.NEAREST) if sharp.size != size else sharp
    box = region(sharp, pad)
    if box is None:
        return image, mask, None
    box = fit_aspect(box, size[0], size[1], size[0], size[1])
    part = image.crop(box).resize(size, Image.Resampling.LANCZOS)
    part_mask = mask.crop(box).resize(size, Image.Resampling.LANCZOS)
    return part, part_mask, Paste(base=image, alpha=mask, box=box)


def paste(result: bytes, how: Paste) -> bytes:
    """The inpainted crop (PNG bytes at the output size) scaled back into its region and pasted
    over the init image through the mask, as PNG bytes."""
    x0, y0, x1, y1 = how.box
    part = Image.open(io.BytesIO(result)).convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
    layer = how.base.copy()
    layer.paste(part, (x0, y0))
    out = Image.composite(layer, how.base, how.alpha)
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
