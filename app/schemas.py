"""Every request and response body of the API, in one module.

Requests are strict (no "2" for 2, no 1 for true) and closed (unknown fields are named in a 422).
Static bounds live on the fields; bounds that depend on the deployment (LATENTD_MAX_N, prompt
length) or on the model (sizes, pixel cap, steps, samplers) are checked by `to_job_params`, which
raises ApiError(422) naming the field and its allowed range.
"""
from __future__ import annotations

import re
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import ApiError, error_from

MAX_SEED = 2**63                 # 0 <= seed < 2**63 (matches model.info.MAX_SEED)
SIZE_RE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


class ImagesGenerationRequest(BaseModel):
    """OpenAI's images.generate body, plus latentd's sampling extensions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="What to draw")
    n: int = Field(1, ge=1, le=16, description="Images to generate (deployment cap: LATENTD_MAX_N)")
    size: str | None = Field(None, max_length=16, description='"WxH", e.g. "512x512"; default: the model\'s native size')
    response_format: Literal["url", "b64_json"] = "url"
    model: str | None = Field(None, max_length=200)
    user: str | None = Field(None, max_length=256, description="End-user id (recorded, not used)")
    quality: str | None = Field(None, max_length=32, description="Accepted for OpenAI compatibility; ignored")
    style: str | None = Field(None, max_length=32, description="Accepted for OpenAI compatibility; ignored")
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    sampler: str | None = Field(None, max_length=32)
    karras: bool | None = None
    seed: int | None = Field(None, ge=0, lt=MAX_SEED, description="Image k uses seed+k; absent: random")
    stream: bool = Field(False, description="Answer text/event-stream with OpenAI's image_generation.* events")
    partial_images: int | None = Field(None, ge=0, le=3, description="Previews to stream per image (with stream)")
    callback_url: str | None = Field(None, min_length=1, max_length=2048,
                                     description="POST the job's record here when it ends (a host on "
                                                 "the server's LATENTD_WEBHOOK_ALLOW)")


def parse_generation_request(body: bytes) -> ImagesGenerationRequest:
    """Validate a raw JSON body (pydantic's Rust JSON parser: one pass, no dict in between).
    Raises ApiError: 400 for bytes that are not UTF-8 JSON, 422 naming the field otherwise."""
    if not body:
        raise ApiError(422, "invalid_body", "request body must be a JSON object", "body", "a JSON object")
    try:
        return ImagesGenerationRequest.model_validate_json(body)
    except ValidationError as e:
        raise error_from(e.errors(include_url=False), ("body",)) from None


# OpenAPI for routes that read the body themselves (the hot path skips FastAPI's body machinery)
GENERATION_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": ImagesGenerationRequest.model_json_schema()}}},
    "security": [{"HTTPBearer": []}]}


class JobParams(BaseModel):
    """A validated request, resolved against the model (defaults filled in)."""

    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    karras: bool
    seed: int
    model: str | None      # None: whatever model the workers serve


def _bad(field: str, message: str, allowed: object) -> ApiError:
    return ApiError(422, "invalid_value", f"{field}: {message}", field, allowed)


def size_allowed(info) -> object:
    if info.sizes:
        return [f"{w}x{h}" for w, h in info.sizes]
    m = info.size_multiple
    return {"multiple_of": m, "min_side": m, "max_side": info.max_side, "max_pixels": info.max_pixels}


def to_job_params(req: ImagesGenerationRequest, info, settings) -> JobParams:
    """Check deployment and model bounds; fill defaults; draw a seed if none was given."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if len(text) > settings.max_prompt_chars:
            raise _bad(name, f"too long ({len(text)} characters)", {"max_chars": settings.max_prompt_chars})
        if "\x00" in text:
            raise _bad(name, "must not contain NUL characters", "text without NUL")
    if req.n > settings.max_n:
        raise _bad("n", f"must be between 1 and {settings.max_n}, got {req.n}", {"min": 1, "max": settings.max_n})
    if req.model is not None and req.model != info.name:
        raise _bad("model", f"unknown model {req.model!r}", [info.name])
    if req.size is None:
        width, height = info.native_width, info.native_height
    else:
        m = SIZE_RE.match(req.size)
        if not m:
            raise _bad("size", f'must be "WIDTHxHEIGHT" such as "{info.native_width}x{info.native_height}", '
                               f"got {req.size!r}", size_allowed(info))
        width, height = int(m.group(1)), int(m.group(2))
        err = info.size_error(width, height)
        if err:
            raise _bad("size", err[1], size_allowed(info))
    steps = info.default_steps if req.steps is None else req.steps
    if not 1 <= steps <= info.max_steps:
        raise _bad("steps", f"must be between 1 and {info.max_steps}, got {steps}", {"min": 1, "max": info.max_steps})
    g = info.default_guidance if req.guidance_scale is None else float(req.guidance_scale)
    if not 0 <= g <= info.max_guidance:
        raise _bad("guidance_scale", f"must be between 0 and {info.max_guidance:g}, got {g:g}",
                   {"min": 0, "max": info.max_guidance})
    sampler = info.default_sampler if req.sampler is None else req.sampler
    if sampler not in info.samplers:
        raise _bad("sampler", f"unknown sampler {sampler!r}", list(info.samplers))
    karras = info.default_karras if req.karras is None else req.karras
    if karras and sampler not in info.karras_samplers:
        raise _bad("karras", f"applies only to {', '.join(info.karras_samplers)}, not {sampler!r}",
                   list(info.karras_samplers))
    if req.seed is None:
        seed = secrets.randbelow(MAX_SEED - req.n)
    elif req.seed + req.n > MAX_SEED:
        raise _bad("seed", f"seed + n - 1 must be below 2**63 (image k uses seed + k), got {req.seed}",
                   {"min": 0, "max": MAX_SEED - req.n})
    else:
        seed = req.seed
    return JobParams(prompt=req.prompt, negative_prompt=req.negative_prompt, n=req.n, width=width,
                     height=height, steps=steps, guidance_scale=g, sampler=sampler, karras=karras,
                     seed=seed, model=req.model)


# --- responses --------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    allowed: object = None
    type: str = "invalid_request_error"
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str
    seed: int
    nsfw: bool


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class JobLinks(BaseModel):
    self: str
    cancel: str
    images: list[str] = []


class JobCreated(BaseModel):
    id: str
    status: str
    links: JobLinks


class Progress(BaseModel):
    step: int = 0
    total: int = 0


class JobImage(BaseModel):
    index: int
    url: str
    seed: int
    nsfw: bool


class JobErrorInfo(BaseModel):
    code: str
    message: str


class Timings(BaseModel):
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    queued_s: float | None = None
    run_s: float | None = None


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    queue_position: int | None = None
    progress: Progress
    timings: Timings
    images: list[JobImage]
    error: JobErrorInfo | None = None
    usage: dict = {}
    params: dict = {}
    links: JobLinks


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobStatus]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "latentd"
    info: dict = {}


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    redis: bool | None = None
    workers: int | None = None
    reason: str | None = None
