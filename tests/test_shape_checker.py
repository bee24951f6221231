"""The procedural checker of bench/eval_shapes.py, tested on procedurally drawn images: the
generator's own images are judged right; squares/triangles with visibly rounded corners, blobs
and empty images are misses; a little blur is tolerated."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from latentd.training import data
from latentd.training.shape_checker import _polygon_sdf, classify


def _draw_polygon(K: int, corner: float, rng, color=(40, 80, 220), bg=(255, 255, 255)) -> Image.Image:
    """A regular K-gon (circumradius 15-35% of 64 px, random centre/rotation) whose corners are
    rounded with radius `corner` x inradius."""
    r = rng.uniform(0.15, 0.35) * 64
    cx, cy = rng.uniform(r, 64 - r, 2)
    th = rng.uniform(0, 2 * math.pi)
    rin = r * math.cos(math.pi / K)
    rc = corner * rin
    rv = (rin - rc) / math.cos(math.pi / K)
    g = np.arange(64) + 0.5
    y, x = g[:, None] - cy, g[None, :] - cx
    u, v = math.cos(th) * x + math.sin(th) * y, -math.sin(th) * x + math.cos(th) * y
    verts = [(rv * math.cos(2 * math.pi * i / K), rv * math.sin(2 * math.pi * i / K)) for i in range(K)]
    a = np.clip(0.5 - (_polygon_sdf(u, v, verts) - rc), 0, 1)[..., None]
    return Image.fromarray((np.array(bg) * (1 - a) + np.array(color) * a).round().astype(np.uint8))


def test_generator_images_are_judged_right():
    b = data.sample(36, torch.Generator().manual_seed(11))
    for im, c, s, g in zip(data.to_pil(b.images), b.color.tolist(), b.shape.tolist(), b.background.tolist()):
        v = classify(im)
        assert (v.color, v.shape, v.background) == (data.COLOR_NAMES[c], data.SHAPES[s], data.BG_NAMES[g]), v


@pytest.mark.parametrize("K,name", [(4, "square"), (3, "triangle")])
def test_rounded_corners_are_misses(K, name):
    rng = np.random.default_rng(K)
    for corner in (0.3, 0.5, 0.8):
        for _ in range(4):
            v = classify(_draw_polygon(K, corner, rng))
            assert v.shape != name, (corner, v)


@pytest.mark.parametrize("K,name", [(4, "square"), (3, "triangle")])
def test_sharp_and_slightly_blurred_polygons_pass(K, name):
    rng = np.random.default_rng(10 + K)
    for _ in range(6):
        im = _draw_polygon(K, 0.0, rng)
        assert classify(im).shape == name
        assert classify(im.filter(ImageFilter.GaussianBlur(0.6))).shape == name


def test_empty_and_two_blobs_are_misses():
    assert classify(Image.new("RGB", (64, 64), (128, 128, 128))).shape == "none"
    a = np.full((64, 64, 3), 255, np.uint8)
    a[5:20, 5:20] = (220, 40, 40)
    a[40:58, 40:58] = (220, 40, 40)
    v = classify(Image.fromarray(a))
    assert v.shape == "none" and v.color == "red" and v.background == "white"


def test_blob_is_not_a_square():
    a = np.full((64, 64, 3), 0, np.uint8)
    yy, xx = np.mgrid[0:64, 0:64]
    blob = ((xx - 32) / 14.0) ** 4 + ((yy - 30) / 11.0) ** 2 < 1   # squarish ellipse
    a[blob] = (40, 180, 60)
    assert classify(Image.fromarray(a)).shape == "none"


def test_stars_are_told_by_solidity_and_their_fit():
    """Drawn stars are stars (solidity about 0.5-0.65); drawn convex shapes fill their hull and are
    never stars; a concave blob that is no star is a miss."""
    star = data.ALL_SHAPES.index(data.STAR)
    b = data.sample(40, torch.Generator().manual_seed(12), shape=star)
    for im, c, g in zip(data.to_pil(b.images), b.color.tolist(), b.background.tolist()):
        v = classify(im)
        assert (v.color, v.shape, v.background) == (data.COLOR_NAMES[c], "star", data.BG_NAMES[g]), v
        assert v.solidity < 0.7
    convex = data.sample(40, torch.Generator().manual_seed(13))
    for im in data.to_pil(convex.images):
        v = classify(im)
        assert v.shape != "star" and v.solidity > 0.95, v
    a = np.full((64, 64, 3), 255, np.uint8)            # an L: concave, but no star
    a[10:50, 10:22] = (220, 40, 40)
    a[38:50, 10:50] = (220, 40, 40)
    v = classify(Image.fromarray(a))
    assert v.solidity < 0.75 and v.shape == "none", v
