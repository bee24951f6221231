"""Procedural checker for generated shapes images (plain image analysis, no learned model).

classify(image) -> Verdict(background, color, shape, ...) for a 64x64 RGB image of
"a {color} {shape} on a {background} background":

  background  median colour of the 2-pixel border, nearest of white/black/gray;
  colour      median of the pixels farthest from the background (the shape's flat interior),
              nearest of the six palette colours;
  coverage    alpha = projection of each pixel onto the background -> shape colour line, in [0, 1]
              (sub-pixel area, anti-aliasing included); the shape is the largest 4-connected
              component of alpha > 0.5; other components with more than 15% of its area: "none";
  shape       two measurements:
              fit error of the best ideal circle / square / equilateral triangle with the same
              centroid and area (rotation searched to 1 degree, anti-aliased like data.py),
              error = sum |alpha - ideal| / area; and, as the corner test, of the same square and
              triangle with ROUNDED corners (radius ROUND x inradius). The shape is the best fit
              if its error <= FIT_MAX; if the best fit is a rounded alternative the image is a
              miss ("none"): a square whose corners look rounded is not a square. Measured on
              drawn images: corner radius <= 15% of the inradius passes, >= 25% fails;
              concavity first: solidity = pixels of the shape / pixels inside its convex hull.
              Convex shapes fill their hull (>= 0.9 on drawn images); a five-pointed star fills
              about half of it. Below SOLIDITY_STAR the only candidate is the ideal star (rotation
              searched within its 72 degree period), accepted if its error <= FIT_MAX_STAR.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from latentd.training.data import BACKGROUNDS, COLORS, STAR_INNER, star_vertices

FIT_MAX = 0.25
FIT_MAX_STAR = 0.35      # a star's thin points make its fit error larger than a convex shape's
SOLIDITY_STAR = 0.75
STRAY_MAX = 0.15
_BG = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
_PAL = np.array(list(COLORS.values()), dtype=np.float32)


@dataclass
class Verdict:
    background: str
    color: str | None
    shape: str            # circle | square | triangle | star | none
    fit_error: dict | None = None
    area: float = 0.0
    solidity: float | None = None

    def correct(self, color: str, shape: str, background: str) -> dict:
        c, s, b = self.color == color, self.shape == shape, self.background == background
        return {"color": c, "shape": s, "background": b, "all": c and s and b}


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected labels of a boolean (H, W) mask: (labels (H, W) int, count)."""
    H, W = mask.shape
    labels = np.zeros((H, W), dtype=np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        stack = [(y0, x0)]
        labels[y0, x0] = n
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
    return labels, n


def _polygon_sdf(x, y, verts) -> np.ndarray:
    """Exact signed distance to a convex polygon (counter-clockwise verts (K, 2)), broadcast over
    x, y: negative inside (max of half-plane distances), outside the distance to the nearest edge."""
    inside = None
    best = None
    K = len(verts)
    for k in range(K):
        ax, ay = verts[k]
        bx, by = verts[(k + 1) % K]
        ex, ey = bx - ax, by - ay
        L = math.hypot(ex, ey)
        nx, ny = ey / L, -ex / L                                           # outward normal (ccw)
        h = (x - ax) * nx + (y - ay) * ny
        inside = h if inside is None else np.maximum(inside, h)
        t = np.clip(((x - ax) * ex + (y - ay) * ey) / (L * L), 0.0, 1.0)
        dd = np.hypot(x - ax - t * ex, y - ay - t * ey)
        best = dd if best is None else np.minimum(best, dd)
    return np.where(inside <= 0, inside, best)


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of (N, 2) points: (K, 2) counter-clockwise."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.array(pts, dtype=np.float64)

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                      - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out
    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def solidity(mask: np.ndarray) -> float:
    """Pixels of a boolean (H, W) mask over the pixel centres inside its convex hull (edges count)."""
    ys, xs = np.nonzero(mask)
    hull = _hull(np.stack([xs, ys], 1).astype(np.float64))
    if len(hull) < 3:
        return 1.0
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    inside = np.ones(gy.shape, dtype=bool)
    for k in range(len(hull)):
        (ax, ay), (bx, by) = hull[k], hull[(k + 1) % len(hull)]
        inside &= (bx - ax) * (gy - ay) - (by - ay) * (gx - ax) >= -1e-9
    return float(mask.sum() / max(int(inside.sum()), 1))


def _star_coverage(u: np.ndarray, v: np.ndarray, area: float) -> np.ndarray:
    """Anti-aliased coverage of the ideal star (data.py's) of a given area at frame coordinates
    (u, v): distance to the nearest edge, negative inside by the crossing number."""
    R = math.sqrt(area / (5 * STAR_INNER * math.sin(math.radians(36))))   # star area = 5 k sin36 R^2
    verts = star_vertices(R)
    dist, inside = None, np.zeros(np.broadcast(u, v).shape, dtype=bool)
    for k in range(10):
        (ax, ay), (bx, by) = verts[k], verts[(k + 1) % 10]
        ex, ey = bx - ax, by - ay
        t = np.clip(((u - ax) * ex + (v - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dk = np.hypot(u - ax - t * ex, v - ay - t * ey)
        dist = dk if dist is None else np.minimum(dist, dk)
        inside ^= ((ay > v) != (by > v)) & (u < ax + (v - ay) * ex / (ey + 1e-12))
    return np.clip(0.5 - np.where(inside, -dist, dist), 0.0, 1.0)


ROUND = 0.35   # corner radius of the "rounded" alternatives, as a fraction of the inradius


def _ideal(shape: str, cx: float, cy: float, area: float, thetas: np.ndarray, size: int,
           rounded: bool = False) -> np.ndarray:
    """Anti-aliased coverage (len(thetas), size, size) of ideal shapes of a given area, drawn as in
    data.py. rounded=True: the same polygon with corners rounded (radius ROUND x inradius), i.e.
    the Minkowski sum of a shrunken polygon and a disc."""
    g = np.arange(size, dtype=np.float64) + 0.5
    y = (g[None, :, None] - cy)
    x = (g[None, None, :] - cx)
    c, s = np.cos(thetas)[:, None, None], np.sin(thetas)[:, None, None]
    u, v = c * x + s * y, -s * x + c * y                                   # shape frame
    if shape == "star":
        return _star_coverage(u, v, area)
    if shape == "circle":
        r = math.sqrt(area / math.pi)
        d = np.sqrt(x * x + y * y) - r + 0 * u
        return np.clip(0.5 - d, 0.0, 1.0)
    K = 4 if shape == "square" else 3
    # regular K-gon with inradius 1: area K tan(pi/K); rounding by k*inradius removes
    # (K tan(pi/K) - pi) k^2 of it
    poly_area = K * math.tan(math.pi / K)
    k = ROUND if rounded else 0.0
    rin = math.sqrt(area / (poly_area - (poly_area - math.pi) * k * k))
    rc = k * rin
    rv = (rin - rc) / math.cos(math.pi / K)                                # shrunken circumradius
    start = math.pi / 4 if K == 4 else -math.pi / 6                        # matches data.py's frames
    verts = [(rv * math.cos(start + 2 * math.pi * i / K), rv * math.sin(start + 2 * math.pi * i / K))
             for i in range(K)]
    d = _polygon_sdf(u, v, verts) - rc
    return np.clip(0.5 - d, 0.0, 1.0)


def classify(image) -> Verdict:
    """image: PIL image or (H, W, 3) uint8 array."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    H, W, _ = a.shape
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                             a[:, -2:].reshape(-1, 3)])
    bg_obs = np.median(border, axis=0)
    bg_i = int(np.argmin(((_BG - bg_obs) ** 2).sum(1)))
    background = list(BACKGROUNDS)[bg_i]
    bg = _BG[bg_i]
    dist = np.sqrt(((a - bg) ** 2).sum(-1))                                  # (H, W)
    cand = dist > 60
    if cand.sum() < 4:
        return Verdict(background, None, "none")
    core = cand & (dist >= np.percentile(dist[cand], 50))
    fg_obs = np.median(a[core], axis=0)
    col_i = int(np.argmin(((_PAL - fg_obs) ** 2).sum(1)))
    color = list(COLORS)[col_i]
    fg = fg_obs
    span = fg - bg
    alpha = np.clip(((a - bg) @ span) / max(float(span @ span), 1e-6), 0.0, 1.0)  # (H, W)
    labels, n = _components(alpha > 0.5)
    if n == 0:
        return Verdict(background, color, "none")
    sizes = np.bincount(labels.ravel(), weights=alpha.ravel())[1:]
    main = int(np.argmax(sizes)) + 1
    comp = labels == main
    # include the anti-aliased rim (alpha <= 0.5) next to the component
    grow = comp.copy()
    grow[1:] |= comp[:-1]
    grow[:-1] |= comp[1:]
    grow[:, 1:] |= comp[:, :-1]
    grow[:, :-1] |= comp[:, 1:]
    area = float(alpha[grow].sum())
    stray = float(sizes.sum() - sizes[main - 1])
    if stray > STRAY_MAX * sizes[main - 1] or area < 8:
        return Verdict(background, color, "none", area=area)
    ys, xs = np.nonzero(grow)
    wts = alpha[ys, xs]
    cx, cy = float((wts * (xs + 0.5)).sum() / wts.sum()), float((wts * (ys + 0.5)).sum() / wts.sum())
    local = np.where(grow | (alpha > 0.05), alpha, 0.0)
    sol = solidity(comp)
    if sol < SOLIDITY_STAR:          # concave: a star or nothing
        err = _fit(local, "star", cx, cy, area, 2 * math.pi / 5, H)
        return Verdict(background, color, "star" if err <= FIT_MAX_STAR else "none", fit_error={"star": err},
                       area=area, solidity=sol)
    errs = {}
    for name, period in (("circle", None), ("square", math.pi / 2), ("triangle", 2 * math.pi / 3)):
        for rounded in ((False,) if name == "circle" else (False, True)):
            errs[name + ("_rounded" if rounded else "")] = _fit(local, name, cx, cy, area, period, H, rounded)
    best = min(errs, key=errs.get)
    ok = errs[best] <= FIT_MAX and not best.endswith("_rounded")
    return Verdict(background, color, best if ok else "none", fit_error=errs, area=area, solidity=sol)


def _fit(local: np.ndarray, name: str, cx: float, cy: float, area: float, period: float | None, size: int,
         rounded: bool = False) -> float:
    """Fit error of the best-rotated ideal shape: sum |coverage - ideal| / area."""
    if period is None:
        err = np.abs(_ideal(name, cx, cy, area, np.zeros(1), size) - local[None]).sum(axis=(1, 2))
    else:  # rotation search: every 6 degrees, then every 1 degree around the best
        coarse = np.arange(0, period, math.radians(6.0))
        e = np.abs(_ideal(name, cx, cy, area, coarse, size, rounded) - local[None]).sum(axis=(1, 2))
        fine = coarse[int(np.argmin(e))] + np.radians(np.arange(-5.0, 5.5, 1.0))
        err = np.abs(_ideal(name, cx, cy, area, fine, size, rounded) - local[None]).sum(axis=(1, 2))
    return float(err.min() / area)
