"""Procedural shapes data set: 64x64 RGB, one flat-coloured shape on a plain background,
captioned "a {color} {shape} on a {background} background". Rendered on the fly, batched and
vectorised in torch with anti-aliased edges (signed distance), deterministic from a Generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COLORS = {  # RGB; each channel jittered by +-15 per image
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (140, 60, 200), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")   # what the base model draws (its 54 captions)
# A shape the base model never saw, taught by the bundled LoRA adapter (training/lora_train.py):
# a regular five-pointed star {5/2}, inner/outer radius sin 18 / sin 54 (concave: about 0.47
# of its convex hull's area, where circles, squares and triangles fill theirs).
STAR = "star"
ALL_SHAPES = SHAPES + (STAR,)
STAR_INNER = math.sin(math.radians(18)) / math.sin(math.radians(54))
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COLOR_NAMES = tuple(COLORS)
BG_NAMES = tuple(BACKGROUNDS)
SIZE = 64
JITTER = 15
R_MIN, R_MAX = 0.15, 0.35   # circumradius as a fraction of the image width
# Stars start larger: below about 0.2 the 4x autoencoder blurs their points into a blob (drawn
# stars reconstructed through the bundled VAE: 68 % still stars at 0.15-0.2, 100 % from 0.2 up).
STAR_R_MIN = 0.22


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


# All 54 captions, index = (color * 3 + shape) * 3 + background.
CAPTIONS = tuple(caption(c, s, b) for c in COLOR_NAMES for s in SHAPES for b in BG_NAMES)
# The 18 star captions, index 54 + color * 3 + background in ALL_CAPTIONS.
STAR_CAPTIONS = tuple(caption(c, STAR, b) for c in COLOR_NAMES for b in BG_NAMES)
ALL_CAPTIONS = CAPTIONS + STAR_CAPTIONS


@dataclass
class Batch:
    images: torch.Tensor     # (B, 3, 64, 64) float in [-1, 1]
    color: torch.Tensor      # (B,) long index into COLOR_NAMES
    shape: torch.Tensor      # (B,) long index into SHAPES
    background: torch.Tensor  # (B,) long index into BG_NAMES
    caption: torch.Tensor    # (B,) long index into ALL_CAPTIONS
    params: dict             # cx, cy, r (pixels), theta (radians), rgb (B, 3) in 0..255

    @property
    def captions(self) -> list[str]:
        return [ALL_CAPTIONS[i] for i in self.caption.tolist()]


def _coverage(shape: torch.Tensor, cx, cy, r, theta, size: int = SIZE) -> torch.Tensor:
    """Fraction of each pixel inside the shape, (B, size, size) in [0, 1], anti-aliased from a
    signed distance d (pixels, < 0 inside): coverage = clamp(0.5 - d, 0, 1).
    Circles: radius r. Squares: circumradius r (half-diagonal), rotated by theta.
    Triangles: equilateral, circumradius r (inradius r/2), rotated by theta.
    Stars (shape 3): five points at circumradius r, inner corners at STAR_INNER * r, rotated."""
    B = shape.shape[0]
    g = torch.arange(size, dtype=torch.float32) + 0.5                  # pixel centres (size,)
    y = g.view(1, size, 1) - cy.view(B, 1, 1)                          # (B, size, 1)
    x = g.view(1, 1, size) - cx.view(B, 1, 1)                          # (B, 1, size)
    c, s = torch.cos(theta).view(B, 1, 1), torch.sin(theta).view(B, 1, 1)
    u, v = c * x + s * y, -s * x + c * y                               # rotate into shape frame
    rr = r.view(B, 1, 1)
    d_circle = torch.sqrt(x * x + y * y) - rr
    d_square = torch.maximum(u.abs(), v.abs()) - rr / math.sqrt(2.0)
    d_tri = None
    for k in range(3):  # half-planes with outward normals at 90, 210, 330 degrees
        a = math.pi / 2 + 2 * math.pi * k / 3
        dk = u * math.cos(a) + v * math.sin(a) - rr / 2
        d_tri = dk if d_tri is None else torch.maximum(d_tri, dk)
    sh = shape.view(B, 1, 1)
    d = torch.where(sh == 0, d_circle, torch.where(sh == 1, d_square, d_tri))
    if bool((shape == 3).any()):
        d = torch.where(sh == 3, _star_distance(u, v, rr), d)
    return (0.5 - d).clamp(0.0, 1.0)


def star_vertices(r: float = 1.0) -> list[tuple[float, float]]:
    """The star's 10 corners (counter-clockwise, first point up) in its own frame."""
    out = []
    for i in range(10):
        a = math.pi / 2 + math.pi * i / 5
        rad = r if i % 2 == 0 else r * STAR_INNER
        out.append((rad * math.cos(a), rad * math.sin(a)))
    return out


def _star_distance(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside) to the star of circumradius r (B, 1, 1) at (u, v)
    (B, H, W): distance to the nearest of its 10 edges, negative where the crossing number is odd."""
    verts = star_vertices()
    dist, inside = None, torch.zeros(torch.broadcast_shapes(u.shape, v.shape), dtype=torch.bool)
    for k in range(10):
        (ax, ay), (bx, by) = verts[k], verts[(k + 1) % 10]
        ax, ay, bx, by = ax * r, ay * r, bx * r, by * r                   # (B, 1, 1) each
        ex, ey = bx - ax, by - ay
        t = (((u - ax) * ex + (v - ay) * ey) / (ex * ex + ey * ey)).clamp(0, 1)
        dk = torch.sqrt((u - ax - t * ex) ** 2 + (v - ay - t * ey) ** 2)
        dist = dk if dist is None else torch.minimum(dist, dk)
        crosses = ((ay > v) != (by > v)) & (u < ax + (v - ay) * ex / (ey + 1e-12))
        inside ^= crosses
    return torch.where(inside, -dist, dist)


def render(color, shape, background, cx, cy, r, theta, rgb) -> torch.Tensor:
    """Images (B, 3, 64, 64) in [-1, 1] from explicit parameters (tests draw with this too)."""
    cov = _coverage(shape, cx, cy, r, theta).unsqueeze(1)             # (B, 1, 64, 64)
    bg = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32)[background]  # (B, 3)
    img = bg.view(-1, 3, 1, 1) * (1 - cov) + rgb.view(-1, 3, 1, 1) * cov
    return img / 127.5 - 1.0


def sample(batch_size: int, gen: torch.Generator, color=None, shape=None, background=None) -> Batch:
    """A random batch. Optionally fix color/shape/background (int index or (B,) tensor); shapes
    are drawn from SHAPES, a star (index 3 of ALL_SHAPES) only when asked for."""
    B = batch_size

    def pick(v, n):
        if v is None:
            return torch.randint(0, n, (B,), generator=gen)
        return torch.as_tensor(v, dtype=torch.long).expand(B).clone()

    col, shp, bgi = pick(color, len(COLORS)), pick(shape, len(SHAPES)), pick(background, len(BACKGROUNDS))
    u = torch.rand(B, generator=gen)
    r_min = torch.where(shp == ALL_SHAPES.index(STAR), STAR_R_MIN, R_MIN)
    r = (r_min + (R_MAX - r_min) * u) * SIZE
    # centre anywhere such that the circumscribed circle is inside the image
    cx = r + (SIZE - 2 * r) * torch.rand(B, generator=gen)
    cy = r + (SIZE - 2 * r) * torch.rand(B, generator=gen)
    theta = 2 * math.pi * torch.rand(B, generator=gen)
    base = torch.tensor(list(COLORS.values()), dtype=torch.float32)[col]
    jit = torch.randint(-JITTER, JITTER + 1, (B, 3), generator=gen).float()
    rgb = (base + jit).clamp(0, 255)
    theta = torch.where(shp == 0, torch.zeros_like(theta), theta)
    images = render(col, shp, bgi, cx, cy, r, theta, rgb)
    capt = torch.where(shp < len(SHAPES), (col * len(SHAPES) + shp) * len(BACKGROUNDS) + bgi,
                       len(CAPTIONS) + col * len(BACKGROUNDS) + bgi)
    return Batch(images, col, shp, bgi, capt, dict(cx=cx, cy=cy, r=r, theta=theta, rgb=rgb))


def to_pil(images: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> list of PIL RGB images."""
    from PIL import Image
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]
