"""What a model and the engine allow of one image request, torch-free.

This is the engine's side of a request: the samplers it has, the defaults a model folder may
override (model/info.py), how an edit counts its steps, and `check(info, r)`, which validates a
request whose every value is already there (width, height, steps, ...) against a model. It fills
nothing in. Service policy (images per request, prompt length, upload pixels, output formats) and
filling in defaults from what a caller sent are the service's: jobs/request.py declares every
request field once and jobs/request_resolve.py resolves a request, calling `check` at the end.
`complete(info, req)` fills an engine request's size and edit strength for callers of the engine
itself (Pipeline.generate); the service never needs it, since it resolves before.

Edits (SDEdit img2img, Meng et al. 2022; inpainting): an init image makes the request `img2img`,
an init image plus a mask `inpaint`. `strength` s in (0, 1] selects how much of the schedule runs:
of `steps` steps, the last int(steps * s) run, starting from the init image noised to the first
of them (diffusers' img2img/inpaint pipelines count the same way, so seeds and images match).
"""
from __future__ import annotations

import dataclasses
import math

from latentd.model.errors import InvalidRequest

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "lcm", "tcd")
KARRAS_SAMPLERS = ("euler", "euler_a", "dpmpp_2m")  # sigma-space samplers (Karras et al. 2022)
# few-step samplers of consistency-distilled models: they step on the skipping grid of
# model/consistency.py (at most its ORIGINAL_STEPS points), not on a timestep spacing
GRID_SAMPLERS = ("lcm", "tcd")
SPACING_SAMPLERS = tuple(s for s in SAMPLERS if s not in GRID_SAMPLERS)
SPACINGS = ("linspace", "leading", "trailing")   # timestep_spacing: None = the model's scheduler config
# eta: DDIM's stochasticity (Song et al. 2021, eq. 16) and TCD's gamma (Zheng et al. 2024);
# a request without one gets its sampler's default (diffusers' TCDScheduler.step: 0.3), else 0
ETA_SAMPLERS = ("ddim", "tcd")
DEFAULT_ETA = {"tcd": 0.3}
MAX_ETA = 1.0
MAX_SEED = 2**63            # seeds: 0 <= seed < 2**63 (torch.Generator.manual_seed takes an int64)
MAX_GUIDANCE = 30.0
# DeepCache (model/deepcache.py): a full U-Net step every N steps, the shallow path between
MAX_CACHE_INTERVAL = 10

# model-independent defaults (a model folder's latentd.json may override them: model/info.py)
DEFAULT_STEPS = 20
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_GUIDANCE = 7.5
DEFAULT_KARRAS = False
KINDS = ("text", "img2img", "inpaint")
# img2img keeps some of the init image by default (diffusers' img2img default); inpainting
# repaints the masked region from pure noise (OpenAI's edits, diffusers' inpaint default)
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}


def kind_of(has_image: bool, has_mask: bool) -> str:
    return "text" if not has_image else ("inpaint" if has_mask else "img2img")


def default_eta(sampler: str, eta: float | None = None) -> float:
    """`eta` itself, or the sampler's default eta when it is None (DEFAULT_ETA, else 0)."""
    return DEFAULT_ETA.get(sampler, 0.0) if eta is None else eta


def check_eta(sampler: str, eta) -> None:
    """eta: a number in [0, MAX_ETA], nonzero only for ETA_SAMPLERS."""
    if not is_num(eta) or not 0.0 <= eta <= MAX_ETA:
        raise InvalidRequest("eta", f"must be a number between 0 and {MAX_ETA:g}, got {eta!r}",
                             {"min": 0, "max": MAX_ETA})
    if eta and sampler not in ETA_SAMPLERS:
        raise InvalidRequest("eta", f"eta applies to the {' and '.join(ETA_SAMPLERS)} samplers only, "
                                    f"not {sampler!r}", list(ETA_SAMPLERS))


def check_spacing(sampler: str, spacing) -> None:
    """timestep_spacing: None (the model's scheduler config) or one of SPACINGS, for the samplers
    that step on a spacing."""
    if spacing is None:
        return
    if spacing not in SPACINGS:
        raise InvalidRequest("timestep_spacing", f"must be one of {', '.join(SPACINGS)}, got {spacing!r}",
                             list(SPACINGS))
    if sampler not in SPACING_SAMPLERS:
        raise InvalidRequest("timestep_spacing", f"applies to {', '.join(SPACING_SAMPLERS)} only; "
                                                 f"{sampler!r} steps on its own skipping grid",
                             list(SPACING_SAMPLERS))


def start_step(steps: int, strength: float | None) -> int:
    """Index of the first step an edit runs: of `steps`, the last int(steps * strength) run
    (diffusers' get_timesteps). 0 for text-to-image."""
    if strength is None:
        return 0
    return steps - min(int(steps * strength), steps)


def size_allowed(info) -> object:
    """The allowed sizes of a model, as shown in an error's `allowed`."""
    if info.sizes:
        return [f"{w}x{h}" for w, h in info.sizes]
    m = info.size_multiple
    return {"multiple_of": m, "min_side": m, "max_side": info.max_side, "max_pixels": info.max_pixels}


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_size(info, width, height, field: str | None = None) -> None:
    """InvalidRequest naming `field` (or width / height) when the model cannot draw width x height.
    field "image": the size came from an edit's init image."""
    for name, v in (("width", width), ("height", height)):
        if not is_int(v):
            raise InvalidRequest(field or name, f"must be an integer, got {v!r}", size_allowed(info))
    err = info.size_error(width, height)
    if err:
        msg = err[1] if field != "image" else (
            f"{err[1]} (an edit is drawn at the image's size unless `size` says otherwise)")
        raise InvalidRequest(field or err[0], msg, size_allowed(info))


def check(info, r, size_field: str | None = None) -> None:
    """Validate a complete request `r` (any object with width, height, steps, guidance_scale,
    sampler, karras, eta, seed, strength, classifier_targets, classifier_scale, and optionally n,
    kind and timestep_spacing) against the model `info` (model.info.ModelInfo). Fills nothing in;
    raises InvalidRequest(field, message, allowed) for the first bad field."""
    for name in ("prompt", "negative_prompt"):
        if not isinstance(getattr(r, name), str):
            raise InvalidRequest(name, "must be a string", "a string")
    check_size(info, r.width, r.height, size_field)
    steps = r.steps
    if not is_int(steps) or not 1 <= steps <= info.max_steps:
        raise InvalidRequest("steps", f"must be an integer between 1 and {info.max_steps}, got {steps!r}",
                             {"min": 1, "max": info.max_steps})
    g = r.guidance_scale
    if not is_num(g) or not 0.0 <= g <= info.max_guidance:
        raise InvalidRequest("guidance_scale", f"must be a finite number between 0 and "
                                               f"{info.max_guidance:g}, got {g!r}",
                             {"min": 0, "max": info.max_guidance})
    if r.sampler not in info.samplers:
        raise InvalidRequest("sampler", f"unknown sampler {r.sampler!r}; one of: " + ", ".join(info.samplers),
                             list(info.samplers))
    if not isinstance(r.karras, bool):
        raise InvalidRequest("karras", "must be true or false", "true or false")
    if r.karras and r.sampler not in info.karras_samplers:
        raise InvalidRequest("karras", f"Karras sigmas apply to {', '.join(info.karras_samplers)} "
                                       f"only, not {r.sampler!r}", list(info.karras_samplers))
    if r.sampler in GRID_SAMPLERS:
        from latentd.model.consistency import ORIGINAL_STEPS
        if steps > ORIGINAL_STEPS:
            raise InvalidRequest("steps", f"{r.sampler} takes at most {ORIGINAL_STEPS} steps (the points "
                                          f"of its skipping grid), got {steps}",
                                 {"min": 1, "max": ORIGINAL_STEPS})
    check_eta(r.sampler, r.eta)
    check_spacing(r.sampler, getattr(r, "timestep_spacing", None))
    check_cache_interval(getattr(r, "cache_interval", 1))
    n = getattr(r, "n", 1)
    if not is_int(r.seed) or not 0 <= r.seed < MAX_SEED:
        raise InvalidRequest("seed", f"must be an integer with 0 <= seed < 2**63, got {r.seed!r}",
                             {"min": 0, "max": MAX_SEED - 1})
    if r.seed + n > MAX_SEED:
        raise InvalidRequest("seed", f"seed + n - 1 must be below 2**63 (image k uses seed + k), got {r.seed}",
                             {"min": 0, "max": MAX_SEED - n})
    _check_strength(getattr(r, "kind", None) or "text", r.strength, steps)
    from latentd.model.classifier_spec import check_targets
    check_targets(getattr(info, "classifier", None), r.classifier_targets, r.classifier_scale)


def check_cache_interval(n) -> None:
    if not is_int(n) or not 1 <= n <= MAX_CACHE_INTERVAL:
        raise InvalidRequest("cache_interval", f"must be an integer between 1 (no step caching) and "
                                               f"{MAX_CACHE_INTERVAL}, got {n!r}", {"min": 1, "max": MAX_CACHE_INTERVAL})


def _check_strength(kind: str, strength, steps: int) -> None:
    if kind == "text":
        if strength is not None:
            raise InvalidRequest("strength", "applies to edits only: send an image", "an image")
        return
    if not is_num(strength) or not 0.0 < strength <= 1.0:
        raise InvalidRequest("strength", f"must be a number with 0 < strength <= 1, got {strength!r}",
                             {"min": 0, "max": 1, "exclusive_min": True})
    if start_step(steps, strength) >= steps:
        raise InvalidRequest("strength", f"runs int(steps x strength) of the steps; {strength:g} x "
                                         f"{steps} steps is less than one (use strength >= {1 / steps:.3g})",
                             {"min": 1 / steps, "max": 1})


def complete(info, req):
    """An engine request (model.pipeline.GenerationRequest) with its size (the init image's, else
    the model's native size), its sampler's eta (default_eta) and an edit's strength
    (DEFAULT_STRENGTH) filled in, then checked.
    For callers of the engine itself; the service resolves once before and sends complete ones."""
    image, mask = req.init_image, req.mask
    if mask is not None and image is None:
        raise InvalidRequest("image", "an image is required with a mask", "an image file")
    if image is not None and mask is not None and tuple(mask.size) != tuple(image.size):
        raise InvalidRequest("mask", f"must be the same size as the image ({image.width}x{image.height}), "
                                     f"got {mask.width}x{mask.height}", f"{image.width}x{image.height}")
    kind = req.kind
    fill, size_field = {}, None
    if req.width is None and req.height is None and image is not None:
        fill.update(width=image.width, height=image.height)
        size_field = "image"
    else:
        if req.width is None:
            fill["width"] = info.native_width
        if req.height is None:
            fill["height"] = info.native_height
    if kind != "text" and req.strength is None:
        fill["strength"] = DEFAULT_STRENGTH[kind]
    if req.eta is None:
        fill["eta"] = default_eta(req.sampler)
    out = dataclasses.replace(req, **fill) if fill else req
    check(info, out, size_field)
    return out
