"""A1111's txt2img / img2img body -> latentd's JobRequest (the body of POST /v1/jobs), once.

Every A1111 field is either mapped, accepted and ignored (it changes nothing that latentd draws:
save_images, do_not_save_*, comments, force_task_id, override_settings_restore_afterwards,
subseed while subseed_strength is 0, s_tmin/s_tmax/s_noise while s_churn is 0, eta for samplers
without one, denoising_strength and hr_* while enable_hr is off, image_cfg_scale,
inpaint_full_res_padding), or, at any value but its off value, a 422 naming it: latentd never
answers with a silently different picture. Absent values are latentd's defaults for the model.
A prompt's <lora:NAME:SCALE> tags pass through as they are: resolving takes them out for every
endpoint (jobs/request_loras.py), and an unknown adapter is a 422 naming `prompt`.
"""
from __future__ import annotations

from pydantic import ValidationError

from latentd.app.a1111 import names
from latentd.app.errors import ApiError, error_from
from latentd.app.schemas import JobRequest
from latentd.model.request import ETA_SAMPLERS, KARRAS_SAMPLERS, MAX_SEED

# latentd's field -> A1111's, for the errors of resolving and admission
FIELD_NAMES = {"guidance_scale": "cfg_scale", "sampler": "sampler_name", "karras": "scheduler",
               "n": "batch_size", "size": "width", "strength": "denoising_strength",
               "image": "init_images", "model": "override_settings.sd_model_checkpoint"}


def refuse(field: str, message: str, allowed: object = None) -> ApiError:
    return ApiError(422, "unsupported_value", f"{field}: {message}", field, allowed)


def renamed(e: ApiError) -> ApiError:
    """An admission error with the field under A1111's name."""
    new = FIELD_NAMES.get(e.field or "")
    if new is None:
        return e
    msg = e.message[len(e.field) + 1:].lstrip() if e.message.startswith(e.field + ":") else e.message
    return ApiError(e.status, e.code, f"{new}: {msg}", new, e.allowed, e.headers)


def _off(value, *offs) -> bool:
    return value in offs or value is None


def check_switches(body, img2img: bool) -> None:
    """A 422 for the first field that asks for something latentd does not do."""
    no = "latentd has no equivalent"
    for field, off, allowed in (
            ("styles", not body.styles, "[]"),
            ("subseed_strength", _off(body.subseed_strength, 0), 0),
            ("seed_resize_from_h", body.seed_resize_from_h <= 0, "-1 or 0"),
            ("seed_resize_from_w", body.seed_resize_from_w <= 0, "-1 or 0"),
            ("restore_faces", not body.restore_faces, False),
            ("tiling", not body.tiling, False),
            ("s_min_uncond", _off(body.s_min_uncond, 0), 0),
            ("s_churn", _off(body.s_churn, 0), 0),
            ("refiner_checkpoint", not body.refiner_checkpoint, None),
            ("firstpass_image", not body.firstpass_image, None),
            ("script_name", _off(body.script_name, "", "None"), None),
            ("infotext", not body.infotext, None)):
        if not off:
            raise refuse(field, f"{no}; send {allowed} or leave it out", allowed)
    if body.alwayson_scripts:
        name = next(iter(body.alwayson_scripts))
        raise refuse(f"alwayson_scripts.{name}", f"{no} (no scripts or extensions); send {{}}", {})
    if not img2img:
        if body.enable_hr:
            raise refuse("enable_hr", f"{no} (no high-res fix); send false, or ask for the size you "
                         "want with width and height", False)
        return
    for field, off, allowed in (
            ("resize_mode", body.resize_mode == 0, "0 (just resize)"),
            ("initial_noise_multiplier", _off(body.initial_noise_multiplier, 1), 1),
            ("latent_mask", not body.latent_mask, None),
            ("include_init_images", not body.include_init_images, False)):
        if not off:
            raise refuse(field, f"{no}; send {allowed} or leave it out", allowed)
    if body.mask is not None:
        if body.inpainting_fill not in (0, 1):
            raise refuse("inpainting_fill", "0 (fill) or 1 (original); latent noise (2) and latent "
                         "nothing (3) have no equivalent", [0, 1])
        if body.inpainting_mask_invert not in (0, 1):
            raise refuse("inpainting_mask_invert", "must be 0 or 1", [0, 1])


def sampler(body, info) -> tuple[str, bool]:
    """(latentd sampler, karras) from sampler_name (else sampler_index, else the model's default)
    and scheduler."""
    accepted = names.sampler_names(info.samplers)
    name = body.sampler_name or body.sampler_index
    if name is None:
        chosen, legacy_karras = info.default_sampler, False
    else:
        s = names.sampler_of(name)
        if s is None or s.sampler not in info.samplers:
            field = "sampler_name" if body.sampler_name else "sampler_index"
            raise refuse(field, f"unknown sampler {name!r}; one of: {', '.join(accepted)}", accepted)
        chosen, legacy_karras = s.sampler, s.karras
    if body.scheduler is not None and body.scheduler not in names.SCHEDULERS:
        labels = [label for _, label in names.SCHEDULER_ITEMS]
        raise refuse("scheduler", f"unknown scheduler {body.scheduler!r}; one of: {', '.join(labels)}", labels)
    karras = legacy_karras or names.SCHEDULERS.get(body.scheduler, False)
    if karras and chosen not in KARRAS_SAMPLERS:
        raise refuse("scheduler", f"Karras applies to {', '.join(names.sampler_names(KARRAS_SAMPLERS))} "
                     "only", ["Automatic"])
    return chosen, karras


def eta(body, chosen: str) -> float | None:
    """DDIM's eta and TCD's gamma are latentd's eta (absent: the sampler's default); Euler a is
    ancestral with eta 1 (A1111's default); the other samplers have none (A1111 ignores it for
    them too)."""
    if chosen in ETA_SAMPLERS:
        return body.eta
    if chosen == "euler_a" and body.eta is not None and body.eta != 1:
        raise refuse("eta", "latentd's Euler a is ancestral with eta 1; send 1 or leave it out", 1)
    return None


def size(body, info) -> str | None:
    """"WxH" (a side left out: the model's native one), or None for the native size. Sizes are
    not rounded: one that the model cannot draw is a 422 naming width or height."""
    if body.width is None and body.height is None:
        return None
    w = info.native_width if body.width is None else body.width
    h = info.native_height if body.height is None else body.height
    err = info.size_error(w, h)
    if err:
        from latentd.model.request import size_allowed

        raise ApiError(422, "invalid_value", f"{err[0]}: {err[1]}", err[0], size_allowed(info))
    return f"{w}x{h}"


def to_job_request(body, info, model: str | None, max_n: int, img2img: bool):
    """The JobRequest, and (latentd sampler, karras) for the answer. Raises ApiError 422."""
    check_switches(body, img2img)
    if body.batch_size < 1 or body.n_iter < 1 or body.batch_size * body.n_iter > max_n:
        field = "batch_size" if body.batch_size < 1 or body.n_iter >= 1 else "n_iter"
        raise ApiError(422, "invalid_value", f"{field}: batch_size x n_iter must be between 1 and {max_n}, "
                       f"got {body.batch_size} x {body.n_iter}", field, {"min": 1, "max_images": max_n})
    if body.seed < -1 or body.seed >= MAX_SEED:
        raise ApiError(422, "invalid_value", "seed: -1 (random) or 0 <= seed < 2**63", "seed",
                       {"min": -1, "max": MAX_SEED - 1})
    if img2img and not body.init_images:
        raise ApiError(422, "missing_field", "init_images: one image is required", "init_images",
                       "a list of one base64 image")
    if img2img and len(body.init_images) > 1:
        raise refuse("init_images", f"one image per request, got {len(body.init_images)}", {"max_items": 1})
    chosen, karras = sampler(body, info)
    values = {"prompt": body.prompt, "negative_prompt": body.negative_prompt,
              "n": body.batch_size * body.n_iter, "size": size(body, info), "steps": body.steps,
              "guidance_scale": None if body.cfg_scale is None else float(body.cfg_scale),
              "sampler": chosen, "karras": karras, "eta": eta(body, chosen),
              "seed": None if body.seed == -1 else body.seed, "model": model,
              "strength": body.denoising_strength if img2img else None,
              "output_format": "png", "response_format": "b64_json"}
    if values["eta"] is not None:
        values["eta"] = float(values["eta"])
    if values["strength"] is not None:
        values["strength"] = float(values["strength"])
    try:
        return JobRequest.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        raise renamed(error_from(e.errors(include_url=False), (), JobRequest)) from None
