"""Resolving a request, once, at the boundary that receives it (the API; `latentd generate`).

`resolve(info, prompt=..., size=..., ...)` takes the request fields of jobs/request.py as a caller
sent them (None = not sent), fills every default once (the model's for steps, sampler, guidance,
karras and size; the sampler's for eta; the declaration's for the rest; an edit's strength by
kind; a random seed), checks the service's bounds (`Limits`), then the model's (model/request.py
`check`) and the few-step gate (jobs/request_fewstep.py), and returns
a `Resolved`: exactly the fields a JobSpec carries. Anything bad raises InvalidRequest(field,
message, allowed) for the first bad field. Downstream (the worker, the executor, the engine's
start) only validates or uses these values; nothing resolves again.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import asdict, make_dataclass

from latentd.jobs.request import (BACKGROUNDS, BY_NAME, FIDELITY_STRENGTH, MAX_DEADLINE_S, MODERATIONS,
                                  OUTPUT_FORMATS, PRIORITIES,
                                  QUALITIES, QUALITY_AS, Limits, spec_names)
from latentd.jobs.request_fewstep import check_few_step
from latentd.jobs.request_loras import resolve_loras
from latentd.model.errors import InvalidRequest
from latentd.model.request import DEFAULT_STRENGTH, MAX_SEED, check, default_eta, is_int, kind_of, size_allowed

SIZE_RE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")

# A complete, checked request: one attribute per JobSpec request field (jobs/request.py "spec").
Resolved = make_dataclass("Resolved", [(name, object) for name in spec_names()], frozen=True,
                          namespace={"to_dict": lambda self: asdict(self)})


def _pick(v, default):
    return default if v is None else v


def _text(name: str, text, limits: Limits) -> str:
    if not isinstance(text, str):
        raise InvalidRequest(name, "must be a string", "a string")
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequest(name, f"too long ({len(text)} characters)", {"max_chars": limits.max_prompt_chars})
    if "\x00" in text:
        raise InvalidRequest(name, "must not contain NUL characters", "text without NUL")
    return text


def resolve(info, *, prompt, negative_prompt=None, n=None, size=None, steps=None, guidance_scale=None,
            sampler=None, karras=None, eta=None, seed=None, strength=None, classifier_guidance=None,
            output_format=None, output_compression=None, model=None, quality=None, background=None,
            moderation=None, input_fidelity=None, priority=None, deadline_s=None, loras=None,
            timestep_spacing=None, cache_interval=None,
            image_size: tuple[int, int] | None = None, mask_size: tuple[int, int] | None = None,
            limits: Limits = Limits(), lora_check=None) -> Resolved:
    """The Resolved request, or InvalidRequest naming the first bad field and its allowed range.

    size: "WxH" or "auto" or None (an edit: the init image's size, else the model's native size).
    image_size / mask_size: (w, h) of the init image and mask as uploaded (an init image of
    another size than the output is resized to it); their presence makes the kind.
    loras and the prompt's <lora:...> tags: jobs/request_loras.py; lora_check(name) -> None or
    why the adapter cannot be used, and its meant_for() -> {adapter: what it is meant for} for the
    few-step gate (the API's: app/loras.py Checker; the CLI's: latentd/cmd_generate.py)."""
    prompt = _text("prompt", prompt, limits)
    negative_prompt = _text("negative_prompt", _pick(negative_prompt, BY_NAME["negative_prompt"].default), limits)
    prompt, loras = resolve_loras(prompt, negative_prompt, loras, lora_check)
    n = _pick(n, BY_NAME["n"].default)
    if not is_int(n) or not 1 <= n <= limits.max_n:
        raise InvalidRequest("n", f"must be an integer between 1 and {limits.max_n}, got {n!r}",
                             {"min": 1, "max": limits.max_n})
    if model is not None and model != info.name:
        raise InvalidRequest("model", f"unknown model {model!r}", [info.name])
    kind = kind_of(image_size is not None, mask_size is not None)
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
    w, h, size_field = _size(info, size, image_size)
    if seed is None:
        seed = secrets.randbelow(MAX_SEED - n + 1)
    if input_fidelity is not None:
        _one_of("input_fidelity", input_fidelity, tuple(FIDELITY_STRENGTH))
        if kind == "text":
            raise InvalidRequest("input_fidelity", "applies only to edits (send an image)",
                                 "an edit's field")
    if kind != "text":
        strength = _pick(strength, (FIDELITY_STRENGTH.get(input_fidelity) or DEFAULT_STRENGTH)[kind])
    quality, steps = _quality(info, quality, steps)
    if _one_of("background", _pick(background, "auto"), BACKGROUNDS) == "transparent":
        raise InvalidRequest("background", "transparent is not available: the model draws no alpha "
                                           "channel (opaque images only)", ["opaque", "auto"])
    moderation = _one_of("moderation", _pick(moderation, BY_NAME["moderation"].default), MODERATIONS)
    priority = _one_of("priority", _pick(priority, BY_NAME["priority"].default), PRIORITIES)
    if deadline_s is not None and (not is_int(deadline_s) or not 1 <= deadline_s <= MAX_DEADLINE_S):
        raise InvalidRequest("deadline_s", f"must be an integer number of seconds between 1 and "
                                           f"{MAX_DEADLINE_S}, got {deadline_s!r}", {"min": 1, "max": MAX_DEADLINE_S})
    fmt = _pick(output_format, BY_NAME["output_format"].default)
    if fmt not in OUTPUT_FORMATS:
        raise InvalidRequest("output_format", f"must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}",
                             list(OUTPUT_FORMATS))
    if output_compression is not None and (not is_int(output_compression)
                                           or not 0 <= output_compression <= 100):
        raise InvalidRequest("output_compression", f"must be an integer between 0 and 100, got "
                                                   f"{output_compression!r}", {"min": 0, "max": 100})
    from latentd.model.classifier_spec import resolve as resolve_classifier
    targets, cscale = resolve_classifier(getattr(info, "classifier", None), classifier_guidance)
    sampler = _pick(sampler, info.default_sampler)
    r = Resolved(prompt=prompt, negative_prompt=negative_prompt, n=n,
                 steps=steps, quality=quality, moderation=moderation, priority=priority,
                 deadline_s=deadline_s, loras=loras,
                 guidance_scale=_pick(guidance_scale, info.default_guidance),
                 sampler=sampler, karras=_pick(karras, info.default_karras),
                 eta=default_eta(sampler, eta), seed=seed, strength=strength,
                 timestep_spacing=timestep_spacing,
                 cache_interval=_pick(cache_interval, BY_NAME["cache_interval"].default),
                 output_format=fmt, output_compression=output_compression, model=model,
                 width=w, height=h, kind=kind, classifier_targets=targets, classifier_scale=cscale)
    check(info, r, size_field)
    check_few_step(info, sampler, loras, getattr(lora_check, "meant_for", None))
    # floats as floats (a JSON 7 is 7.0), once the checks have seen the numbers as sent
    return Resolved(**{**r.to_dict(), "guidance_scale": float(r.guidance_scale), "eta": float(r.eta),
                       "strength": None if r.strength is None else float(r.strength)})


def _one_of(name: str, value, allowed: tuple):
    if value not in allowed:
        raise InvalidRequest(name, f"must be one of {', '.join(allowed)}, got {value!r}", list(allowed))
    return value


def _quality(info, quality, steps) -> tuple[str, int]:
    """(the quality a job reports, its steps). quality names a preset of the model
    (ModelInfo.quality_steps); an explicit steps wins, and the job then reports the preset
    nearest to it (a tie: the lower)."""
    q = _one_of("quality", _pick(quality, "auto"), QUALITIES)
    presets = info.quality_steps
    if steps is None:
        q = QUALITY_AS.get(q, q)
        return q, presets[q]
    if not is_int(steps):
        return q, steps                      # check() names steps
    return min(presets, key=lambda k: abs(presets[k] - steps)), steps


def _size(info, size, image_size) -> tuple[int, int, str | None]:
    """(w, h, the field a size error names: "size", "image", or None for the native size).
    size "auto" (OpenAI's default for its newer models) is the same as no size."""
    if size is not None and size != "auto":
        m = SIZE_RE.match(size) if isinstance(size, str) else None
        if not m:
            raise InvalidRequest("size", f'must be "WIDTHxHEIGHT" such as "{info.native_width}x'
                                         f'{info.native_height}", got {size!r}', size_allowed(info))
        return int(m.group(1)), int(m.group(2)), "size"
    if image_size is not None:
        return int(image_size[0]), int(image_size[1]), "image"
    return info.native_width, info.native_height, None
