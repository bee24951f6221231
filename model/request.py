"""Resolving a request: every default, bound and model limit of a request, in one torch-free place.

`resolve(info, ...)` takes what a caller sent (None = not sent), fills the model's defaults,
checks every bound (deployment caps in `Limits`, the model's sizes/steps/samplers in
`model.info.ModelInfo`) and returns a `Resolved` request, or raises `InvalidRequest(field,
message, allowed)` for the first bad field. The API (app/schemas.py), the worker's job spec
(jobs/spec.py), the engine's own check (model/info.py `check_request`) and `latentd generate`
all call it, so a field, a default or a bound is written here once; the engine trusts what this
resolved.

Edits (SDEdit img2img, Meng et al. 2022; inpainting): an init image makes the request `img2img`,
an init image plus a mask `inpaint`. `strength` s in (0, 1] selects how much of the schedule runs:
of `steps` steps, the last int(steps * s) run, starting from the init image noised to the first
of them (diffusers' img2img/inpaint pipelines count the same way, so seeds and images match).
"""
from __future__ import annotations

import math
import re
import secrets
from dataclasses import asdict, dataclass

from latentd.model.errors import InvalidRequest

SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m")
KARRAS_SAMPLERS = ("euler", "euler_a", "dpmpp_2m")  # sigma-space samplers (Karras et al. 2022)
MAX_SEED = 2**63            # seeds: 0 <= seed < 2**63 (torch.Generator.manual_seed takes an int64)
MAX_GUIDANCE = 30.0
MAX_N = 16                  # images per request, the hard cap (deployments lower it: LATENTD_MAX_N)
MAX_PROMPT_CHARS = 4000     # the text encoder truncates at 77 tokens anyway; this bounds payloads
MAX_IMAGE_PIXELS = 4096 * 4096   # an uploaded init image / mask, before it is resized

# model-independent defaults (a model folder's latentd.json may override the first four)
DEFAULT_STEPS = 20
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_GUIDANCE = 7.5
DEFAULT_KARRAS = False
KINDS = ("text", "img2img", "inpaint")
# img2img keeps some of the init image by default (diffusers' img2img default); inpainting
# repaints the masked region from pure noise (OpenAI's edits, diffusers' inpaint default)
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}
OUTPUT_FORMATS = ("png", "jpeg", "webp")
SIZE_RE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


@dataclass(frozen=True)
class Limits:
    """Deployment bounds (LATENTD_MAX_N, LATENTD_MAX_PROMPT_CHARS, LATENTD_MAX_IMAGE_PIXELS)."""

    max_n: int = MAX_N
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_image_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(max_n=min(int(settings.max_n), MAX_N),
                   max_prompt_chars=min(int(settings.max_prompt_chars), MAX_PROMPT_CHARS),
                   max_image_pixels=int(getattr(settings, "max_image_pixels", MAX_IMAGE_PIXELS)))


@dataclass(frozen=True)
class Resolved:
    """A complete, checked request: every field has its value (seed drawn if none was sent)."""

    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    karras: bool
    eta: float
    seed: int
    kind: str = "text"                  # text | img2img | inpaint
    strength: float | None = None       # edits only
    output_format: str = "png"
    output_compression: int | None = None
    classifier_targets: tuple[tuple[str, str], ...] = ()   # classifier guidance ((head, label), ...)
    classifier_scale: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pick(v, default):
    return default if v is None else v


def resolve(info, *, prompt, negative_prompt=None, n=None, size=None, width=None, height=None,
            steps=None, guidance_scale=None, sampler=None, karras=None, eta=None, seed=None,
            image_size: tuple[int, int] | None = None, mask_size: tuple[int, int] | None = None,
            strength=None, output_format=None, output_compression=None, classifier_guidance=None,
            limits: Limits = Limits()) -> Resolved:
    """The Resolved request, or InvalidRequest naming the first bad field and its allowed range.

    size: "WxH" or "auto" (API) or width/height (engine, CLI); neither: the init image's size for edits,
    else the model's native size. image_size / mask_size: (w, h) of the init image and mask as
    uploaded (an init image of another size than the output is resized to it). seed None: drawn
    at random so that seed + n - 1 < 2**63."""
    for name, text in (("prompt", prompt), ("negative_prompt", _pick(negative_prompt, ""))):
        if not isinstance(text, str):
            raise InvalidRequest(name, "must be a string", "a string")
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequest(name, f"too long ({len(text)} characters)",
                                 {"max_chars": limits.max_prompt_chars})
        if "\x00" in text:
            raise InvalidRequest(name, "must not contain NUL characters", "text without NUL")
    n = _pick(n, 1)
    if not _is_int(n) or not 1 <= n <= limits.max_n:
        raise InvalidRequest("n", f"must be an integer between 1 and {limits.max_n}, got {n!r}",
                             {"min": 1, "max": limits.max_n})

    kind = "text" if image_size is None else ("inpaint" if mask_size is not None else "img2img")
    if mask_size is not None and image_size is None:
        raise InvalidRequest("image", "an image is required with a mask", "an image file")
    if image_size is not None:
        iw, ih = image_size
        if iw * ih > limits.max_image_pixels:
            raise InvalidRequest("image", f"{iw}x{ih} = {iw * ih} pixels exceeds the maximum of "
                                          f"{limits.max_image_pixels} pixels",
                                 {"max_pixels": limits.max_image_pixels})
        if mask_size is not None and tuple(mask_size) != tuple(image_size):
            raise InvalidRequest("mask", f"must be the same size as the image ({iw}x{ih}), got "
                                         f"{mask_size[0]}x{mask_size[1]}", f"{iw}x{ih}")

    w, h, size_field = _size(info, size, width, height, image_size)
    err = info.size_error(w, h)
    if err:
        field = size_field or err[0]
        msg = err[1] if size_field != "image" else (
            f"{err[1]} (an edit is drawn at the image's size unless `size` says otherwise)")
        raise InvalidRequest(field, msg, size_allowed(info))

    steps = _pick(steps, info.default_steps)
    if not _is_int(steps) or not 1 <= steps <= info.max_steps:
        raise InvalidRequest("steps", f"must be an integer between 1 and {info.max_steps}, got {steps!r}",
                             {"min": 1, "max": info.max_steps})
    g = _pick(guidance_scale, info.default_guidance)
    if not _is_num(g) or not 0.0 <= g <= info.max_guidance:
        raise InvalidRequest("guidance_scale", f"must be a finite number between 0 and "
                                               f"{info.max_guidance:g}, got {g!r}",
                             {"min": 0, "max": info.max_guidance})
    sampler = _pick(sampler, info.default_sampler)
    if sampler not in info.samplers:
        raise InvalidRequest("sampler", f"unknown sampler {sampler!r}; one of: " + ", ".join(info.samplers),
                             list(info.samplers))
    karras = _pick(karras, info.default_karras)
    if not isinstance(karras, bool):
        raise InvalidRequest("karras", "must be true or false", "true or false")
    if karras and sampler not in info.karras_samplers:
        raise InvalidRequest("karras", f"Karras sigmas apply to {', '.join(info.karras_samplers)} "
                                       f"only, not {sampler!r}", list(info.karras_samplers))
    eta = _pick(eta, 0.0)
    if not _is_num(eta) or not 0.0 <= eta <= 1.0:
        raise InvalidRequest("eta", f"must be a number between 0 and 1, got {eta!r}", {"min": 0, "max": 1})
    if eta and sampler != "ddim":
        raise InvalidRequest("eta", f"eta applies to the ddim sampler only, not {sampler!r}", ["ddim"])

    if seed is None:
        seed = secrets.randbelow(MAX_SEED - n + 1)
    elif not _is_int(seed) or not 0 <= seed < MAX_SEED:
        raise InvalidRequest("seed", f"must be an integer with 0 <= seed < 2**63, got {seed!r}",
                             {"min": 0, "max": MAX_SEED - 1})
    elif seed + n > MAX_SEED:
        raise InvalidRequest("seed", f"seed + n - 1 must be below 2**63 (image k uses seed + k), got {seed}",
                             {"min": 0, "max": MAX_SEED - n})

    if kind == "text":
        if strength is not None:
            raise InvalidRequest("strength", "applies to edits only: send an image", "an image")
    else:
        strength = _pick(strength, DEFAULT_STRENGTH[kind])
        if not _is_num(strength) or not 0.0 < strength <= 1.0:
            raise InvalidRequest("strength", f"must be a number with 0 < strength <= 1, got {strength!r}",
                                 {"min": 0, "max": 1, "exclusive_min": True})
        if start_step(steps, strength) >= steps:
            raise InvalidRequest("strength", f"runs int(steps x strength) of the steps; {strength:g} x "
                                             f"{steps} steps is less than one (use strength >= {1 / steps:.3g})",
                                 {"min": 1 / steps, "max": 1})
        strength = float(strength)

    fmt = _pick(output_format, "png")
    if fmt not in OUTPUT_FORMATS:
        raise InvalidRequest("output_format", f"must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}",
                             list(OUTPUT_FORMATS))
    if output_compression is not None and (not _is_int(output_compression)
                                           or not 0 <= output_compression <= 100):
        raise InvalidRequest("output_compression", f"must be an integer between 0 and 100, got "
                                                   f"{output_compression!r}", {"min": 0, "max": 100})
    from latentd.model.classifier_spec import resolve as resolve_classifier
    targets, cscale = resolve_classifier(getattr(info, "classifier", None), classifier_guidance)
    return Resolved(prompt=prompt, negative_prompt=_pick(negative_prompt, ""), n=n, width=w, height=h,
                    steps=steps, guidance_scale=float(g), sampler=sampler, karras=karras,
                    eta=float(eta), seed=seed, kind=kind, strength=strength, output_format=fmt,
                    output_compression=output_compression, classifier_targets=targets,
                    classifier_scale=cscale)


def _size(info, size, width, height, image_size) -> tuple[int, int, str | None]:
    """(w, h, the field a size error names: "size", "image", or None for width/height).
    size "auto" (OpenAI's default for its newer models) is the same as no size."""
    if size is not None and size != "auto":
        m = SIZE_RE.match(size) if isinstance(size, str) else None
        if not m:
            raise InvalidRequest("size", f'must be "WIDTHxHEIGHT" such as "{info.native_width}x'
                                         f'{info.native_height}", got {size!r}', size_allowed(info))
        return int(m.group(1)), int(m.group(2)), "size"
    if width is None and height is None and image_size is not None:
        return int(image_size[0]), int(image_size[1]), "image"
    w = info.native_width if width is None else width
    h = info.native_height if height is None else height
    for name, v in (("width", w), ("height", h)):
        if not _is_int(v):
            raise InvalidRequest(name, f"must be an integer, got {v!r}", size_allowed(info))
    return w, h, None
