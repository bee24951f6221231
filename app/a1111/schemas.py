"""The /sdapi/v1 bodies, with AUTOMATIC1111's field names.

Requests are closed (an unknown field is a 422 naming it) and declare every field A1111's own
txt2img/img2img models take, at A1111's defaults, so a client that sends all of them at their
off values (webuiapi does) is accepted. What each field does here is translate.py's. A field
left out takes latentd's default for the model (as /v1 does), not A1111's 512x512 / 50 steps.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from latentd.app.schemas import ErrorDetail


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Common(_Body):
    """The fields txt2img and img2img share."""
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(-1, description="-1: random (returned in info.seed)")
    subseed: int = Field(-1, description="ignored while subseed_strength is 0")
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(None, description="A1111's name: GET /sdapi/v1/samplers")
    sampler_index: str | None = Field(None, description="deprecated; used when sampler_name is absent")
    scheduler: str | None = Field(None, description="Automatic or Karras")
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = Field(False, description="ignored: latentd keeps every result for LATENTD_RESULT_TTL_S")
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_Common):
    # the high-res fix: off is the only value accepted
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Common):
    init_images: list[str] | None = Field(None, description="one base64 image (a data: URL is fine)")
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="base64; white = repaint")
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = Field(0, description="0 fill, 1 original (2 and 3 are refused)")
    inpaint_full_res: bool = Field(False, description="inpaint only the masked region (grown by the "
                                   "padding) at the output size, pasted back")
    inpaint_full_res_padding: int = Field(0, description="pixels around the masked region (0-256)")
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False




class ImagesResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs")
    parameters: dict
    info: str = Field(description="a JSON string: seed, all_seeds, infotexts, sd_model_name, ...")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class PNGInfoRequest(_Body):
    image: str = Field(description="base64 image (a data: URL is fine)")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class ScriptsList(BaseModel):
    txt2img: list = []
    img2img: list = []


class SdError(BaseModel):
    """A1111 clients read `detail`; `error` is latentd's error (field, allowed)."""
    detail: str | None = None
    error: ErrorDetail | None = None
