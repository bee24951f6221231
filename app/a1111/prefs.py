"""The options a key reads and sets through /sdapi/v1/options.

Only `sd_model_checkpoint` is settable: it is the calling key's default model for /sdapi
requests that name none (kept in Redis, jobs/keys.py sdapi_model; never another key's, and
/v1 requests keep the deployment's default). The other options are facts of latentd that
clients read; sending one back unchanged is fine (Open WebUI posts the whole dict back), a
different value is a 422 naming it.
"""
from __future__ import annotations

import re

from latentd.app.errors import ApiError
from latentd.jobs import keys
from latentd.jobs.events import DEFAULT_PREVIEW_EVERY

FIXED = {"samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
         "eta_ddim": 0.0, "eta_ancestral": 1.0, "eta_noise_seed_delta": 0, "enable_pnginfo": True,
         "live_previews_enable": True, "show_progress_every_n_steps": DEFAULT_PREVIEW_EVERY,
         "img2img_fix_steps": False}
_HASH = re.compile(r"\s*\[[0-9a-fA-F]{1,64}\]$")    # "name [abc123]", A1111's title form


def model_named(models, value, field: str = "sd_model_checkpoint") -> str:
    """The deployment's model a checkpoint title names (its name, optionally with A1111's
    " [hash]" suffix); a 422 naming `field` otherwise."""
    known = [e.name for e in models.entries]
    name = _HASH.sub("", value) if isinstance(value, str) else None
    if name not in known:
        raise ApiError(422, "invalid_value", f"{field}: unknown model {value!r}; one of: {', '.join(known)}",
                       field, known)
    return name


def current_model(st, owner: str) -> str:
    """The key's chosen model (if the deployment still has it), else the deployment's default."""
    raw = st.redis.get(keys.sdapi_model(owner))
    name = raw.decode() if isinstance(raw, bytes) else raw
    known = {e.name for e in st.models.entries}
    return name if name in known else st.models.default.name


def options(st, owner: str) -> dict:
    return {"sd_model_checkpoint": current_model(st, owner), "sd_checkpoint_hash": None, **FIXED}


def check_overrides(settings: dict | None, models) -> str | None:
    """override_settings of a request: the model it selects (None: none), or a 422."""
    chosen = None
    for k, v in (settings or {}).items():
        if k == "sd_model_checkpoint":
            chosen = model_named(models, v, "override_settings.sd_model_checkpoint")
        elif k not in FIXED or FIXED[k] != v:
            raise _fixed(f"override_settings.{k}", k, v)
    return chosen


def _fixed(field: str, k: str, v) -> ApiError:
    if k in FIXED:
        return ApiError(422, "unsupported_value", f"{field}: fixed at {FIXED[k]!r} in latentd, got {v!r}",
                        field, FIXED[k])
    return ApiError(422, "unsupported_option", f"{field}: not an option latentd has; settable: "
                    "sd_model_checkpoint", field, ["sd_model_checkpoint", *FIXED])


def set_options(st, owner: str, body: dict) -> None:
    """Validate every option first, then store the key's model (nothing is half-applied)."""
    chosen = None
    for k, v in body.items():
        if k == "sd_model_checkpoint":
            chosen = model_named(st.models, v)
        elif k == "sd_checkpoint_hash":
            continue                    # read-only, sent back by clients that post the whole dict
        elif k not in FIXED or FIXED[k] != v:
            raise _fixed(k, k, v)
    if chosen is not None:
        st.redis.set(keys.sdapi_model(owner), chosen)
