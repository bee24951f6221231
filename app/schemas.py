"""Every request and response body of the API, in one module.

JSON requests are strict (no "2" for 2, no 1 for true) and closed (unknown fields are named in a
422); multipart edits are read in pydantic's lax mode, since every form value is a string. Static
bounds live on the fields; defaults and the bounds that depend on the deployment (LATENTD_MAX_N,
prompt length, image pixels) or on the model (sizes, pixel cap, steps, samplers, strength) are
model.request.resolve's, which `to_job_params` calls and turns into ApiError(422) naming the field
and its allowed range.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from latentd.app.errors import ApiError, error_from
from latentd.model.errors import InvalidRequest
from latentd.model.request import KINDS, MAX_N, MAX_SEED, OUTPUT_FORMATS, Limits, Resolved, resolve

OutputFormat = Literal[OUTPUT_FORMATS]


class ImagesGenerationRequest(BaseModel):
    """OpenAI's images.generate body, plus latentd's sampling extensions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="What to draw; may be empty only with classifier_guidance")
    n: int = Field(1, ge=1, le=MAX_N, description="Images to generate (deployment cap: LATENTD_MAX_N)")
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
    classifier_guidance: dict[str, str | float | None] | None = Field(
        None, description='Steer by the model\'s classifier (GET /v1/models lists its attributes): '
                          '{"color": "red", "shape": "triangle", "scale": 2.0}; any subset of the attributes')
    output_format: OutputFormat | None = Field(None, description="png (default) | jpeg | webp")
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG/WebP quality, 0-100")


class JobRequest(ImagesGenerationRequest):
    """POST /v1/jobs as JSON: a generation, or an edit with the init image (and mask) in base64."""

    image: str | None = Field(None, description="Init image (PNG/JPEG/WebP), base64: an edit")
    mask: str | None = Field(None, description="Mask (PNG): transparent or white = repaint; base64")
    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                   description="Edits: how much of the schedule runs (0 < s <= 1)")


class ImagesEditForm(BaseModel):
    """The non-file fields of POST /v1/images/edits (multipart, as OpenAI's images.edit sends
    them), plus latentd's sampling extensions. Lax: form values arrive as strings."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What the edited image should show")
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = Field(None, max_length=16, description='"WxH"; default: the image\'s size')
    response_format: Literal["url", "b64_json"] = "url"
    model: str | None = Field(None, max_length=200)
    user: str | None = Field(None, max_length=256)
    quality: str | None = Field(None, max_length=32, description="Accepted for OpenAI compatibility; ignored")
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    sampler: str | None = Field(None, max_length=32)
    karras: bool | None = None
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(None, ge=0, le=100)


def parse_edit_form(fields: dict) -> ImagesEditForm:
    try:
        return ImagesEditForm.model_validate(fields)
    except ValidationError as e:
        raise error_from(e.errors(include_url=False), ("body",), ImagesEditForm) from None


def parse_generation_request(body: bytes, cls: type[BaseModel] = ImagesGenerationRequest):
    """Validate a raw JSON body (pydantic's Rust JSON parser: one pass, no dict in between).
    Raises ApiError: 400 for bytes that are not UTF-8 JSON, 422 naming the field otherwise."""
    if not body:
        raise ApiError(422, "invalid_body", "request body must be a JSON object", "body", "a JSON object")
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        raise error_from(e.errors(include_url=False), ("body",), cls) from None


# OpenAPI for routes that read the body themselves (the hot path skips FastAPI's body machinery)
GENERATION_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": ImagesGenerationRequest.model_json_schema()}}},
    "security": [{"HTTPBearer": []}]}


def _edit_form_schema() -> dict:
    schema = ImagesEditForm.model_json_schema()
    schema["properties"] = {"image": {"type": "string", "format": "binary", "description":
                                      "PNG, JPEG or WebP to edit (also sent as image[])"},
                            "mask": {"type": "string", "format": "binary", "description":
                                     "PNG, same size: transparent (or white) = repaint"},
                            **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]
    return schema


EDIT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": _edit_form_schema()}}},
    "security": [{"HTTPBearer": []}]}
JOB_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": JobRequest.model_json_schema()},
    "multipart/form-data": {"schema": _edit_form_schema()}}},
    "security": [{"HTTPBearer": []}]}


def invalid(e: InvalidRequest) -> ApiError:
    """The 422 for a request the resolver refused: names the field and the allowed range."""
    return ApiError(422, "invalid_value", str(e), e.field, e.allowed)


def to_job_params(req, info, settings, image_size: tuple[int, int] | None = None,
                  mask_size: tuple[int, int] | None = None) -> Resolved:
    """Resolve `req` (a generation, job or edit request) with model.request.resolve: deployment
    and model bounds checked, defaults filled in, a seed drawn if none was given."""
    if req.prompt == "" and not getattr(req, "classifier_guidance", None):
        raise ApiError(422, "invalid_value", "prompt: must not be empty (an empty prompt is allowed "
                       "only with classifier_guidance)", "prompt", {"min_length": 1})
    if req.model is not None and req.model != info.name:
        raise ApiError(422, "invalid_value", f"model: unknown model {req.model!r}", "model", [info.name])
    try:
        r = resolve(info, prompt=req.prompt, negative_prompt=req.negative_prompt, n=req.n,
                    size=req.size, steps=req.steps, guidance_scale=req.guidance_scale,
                    sampler=req.sampler, karras=req.karras, seed=req.seed,
                    image_size=image_size, mask_size=mask_size, strength=getattr(req, "strength", None),
                    output_format=req.output_format, output_compression=req.output_compression,
                    classifier_guidance=getattr(req, "classifier_guidance", None),
                    limits=Limits.from_settings(settings))
    except InvalidRequest as e:
        raise invalid(e) from None
    return r


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
    output_format: str | None = None


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
    kind: Literal[KINDS] = "text"
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
