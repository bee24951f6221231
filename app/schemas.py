"""Every request and response body of the API, in one module.

The request bodies are derived from the request declaration (jobs/request.py) by
jobs/request_models.py: JSON requests are strict (no "2" for 2, no 1 for true) and closed
(unknown fields are named in a 422); multipart edits are read in pydantic's lax mode, since every
form value is a string. Static bounds live on the fields; defaults and the bounds that depend on
the deployment (LATENTD_MAX_N, prompt length, image pixels) or on the model (sizes, pixel cap,
steps, samplers, strength) are resolved once by jobs/request_resolve.py, which `to_job_params`
calls and turns into ApiError(422) naming the field and its allowed range.
"""
from __future__ import annotations

import inspect
from typing import Literal

from pydantic import BaseModel, ValidationError

from latentd.app.errors import ApiError, error_from
from latentd.jobs.request import BY_NAME, Limits
from latentd.jobs.request_models import api_model
from latentd.jobs.request_resolve import Resolved, resolve
from latentd.model.errors import InvalidRequest
from latentd.model.request import KINDS

ImagesGenerationRequest = api_model(
    "generation", "ImagesGenerationRequest", "OpenAI's images.generate body, plus latentd's sampling extensions.")
JobRequest = api_model(
    "job", "JobRequest", "POST /v1/jobs as JSON: a generation, or an edit with the init image (and mask) in base64.")
ImagesEditForm = api_model(
    "edit", "ImagesEditForm", "The non-file fields of POST /v1/images/edits (multipart, as OpenAI's "
    "images.edit sends them), plus latentd's sampling extensions. Lax: form values arrive as strings.",
    strict=False)
SURFACE_OF = {ImagesGenerationRequest: "generation", JobRequest: "job", ImagesEditForm: "edit"}
WHERE = {"generation": "POST /v1/images/generations", "job": "POST /v1/jobs (JSON)",
         "edit": "POST /v1/images/edits and multipart POST /v1/jobs"}


def _not_here(e: ApiError, cls) -> ApiError:
    """An unknown field that the declaration knows (e.g. `stream` sent to /v1/jobs): say where it
    does apply, still as a 422 naming the field."""
    f = BY_NAME.get(e.field or "")
    if e.code != "unknown_field" or f is None:
        return e
    where = [WHERE[s] for s in ("generation", "job", "edit") if s in f.on]
    return ApiError(422, "unsupported_field", f"{e.field}: not accepted by this endpoint"
                    + (f"; it applies to {' and '.join(where)}" if where else ""), e.field,
                    sorted(cls.model_fields))


def parse_edit_form(fields: dict) -> ImagesEditForm:
    try:
        return ImagesEditForm.model_validate(fields)
    except ValidationError as e:
        raise _not_here(error_from(e.errors(include_url=False), ("body",), ImagesEditForm),
                        ImagesEditForm) from None


def parse_generation_request(body: bytes, cls: type[BaseModel] = ImagesGenerationRequest):
    """Validate a raw JSON body (pydantic's Rust JSON parser: one pass, no dict in between).
    Raises ApiError: 400 for bytes that are not UTF-8 JSON, 422 naming the field otherwise."""
    if not body:
        raise ApiError(422, "invalid_body", "request body must be a JSON object", "body", "a JSON object")
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        raise _not_here(error_from(e.errors(include_url=False), ("body",), cls), cls) from None


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
                  mask_size: tuple[int, int] | None = None, lora_check=None) -> Resolved:
    """Resolve `req` (a generation, job or edit body) once: deployment and model bounds checked,
    defaults filled in, a seed drawn if none was given. Every field of the body that the job
    carries is passed by name (the declaration says which: jobs/request.py `spec` / `spec_as`).
    lora_check: the adapters this model can use (app/loras.py checker)."""
    if req.prompt == "" and not getattr(req, "classifier_guidance", None):
        raise ApiError(422, "invalid_value", "prompt: must not be empty (an empty prompt is allowed "
                       "only with classifier_guidance)", "prompt", {"min_length": 1})
    try:
        return resolve(info, **request_values(req), image_size=image_size, mask_size=mask_size,
                       limits=Limits.from_settings(settings), lora_check=lora_check)
    except InvalidRequest as e:
        raise invalid(e) from None


_RESOLVES = frozenset(inspect.signature(resolve).parameters) - {"info", "image_size", "mask_size", "limits",
                                                                "lora_check"}


def request_values(req) -> dict:
    """The fields of a body that resolving reads (every one `resolve` takes by name), uploads
    aside (their sizes are passed instead)."""
    return {name: getattr(req, name) for name in req.model_fields if name in _RESOLVES}


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


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class Usage(BaseModel):
    """OpenAI's usage, counted for a diffusion model (jobs/usage.py says what each counts), plus
    latentd's compute_seconds."""
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int
    compute_seconds: float


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str | None = None
    size: str | None = None                     # "WxH" as drawn
    quality: str | None = None                  # the steps preset (jobs/request_resolve.py)
    background: Literal["opaque"] | None = None
    usage: Usage | None = None


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
    parked: bool = False    # set aside (state kept) while the worker runs higher-priority work


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
    attempts: int = 0                  # claims by workers so far (> 1: re-run after a lost worker)
    resumed_from_step: int | None = None   # a re-run went on from this progress step (saved rows)
    links: JobLinks


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobStatus]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "latentd"
    default: bool = False              # the model a request without `model` gets
    workers: int = 0                   # ready workers serving it (0: its jobs wait in its queue)
    info: dict = {}                    # ModelInfo: family, native size, sizes, samplers (standalone_samplers:
                                       # those it takes without an adapter), limits, classifier
                                       # ({} while not known: no folder, no worker)
    loras: list[dict] = []             # the LoRA adapters it can use (app/loras.py), each with its
                                       # meant_for when its metadata says (samplers, steps, ...)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoraList(BaseModel):
    """GET /v1/loras: each adapter file (model/lora_catalog.py LoraInfo.public: name, format,
    family, rank, layers, targets, kinds, context_dim, bytes), its `file` under an adapter
    folder, the models that can use it (`compatible`) and why others cannot (`incompatible`);
    a file latentd cannot use has `error` instead."""
    object: Literal["list"] = "list"
    data: list[dict]


class Health(BaseModel):
    status: str
    redis: bool | None = None
    workers: int | None = None
    models: dict[str, int] | None = None       # model -> its ready workers
    no_workers: list[str] | None = None        # models nobody serves now (their jobs wait)
    reason: str | None = None


class UsageTotals(BaseModel):
    """Summed over jobs that ended (GET /v1/usage); each job's own are its `usage` field."""
    images: int = 0                    # images made (recorded)
    compute_seconds: float = 0.0       # worker time charged (a stopped job's so far included)
    steps: int = 0                     # denoising steps run
    jobs: int = 0                      # jobs that ended (succeeded, failed or canceled)


class UsageDay(BaseModel):
    date: str                          # UTC day (YYYY-MM-DD) the jobs ended
    total: UsageTotals
    by_model: dict[str, UsageTotals]


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    start: str                         # first UTC day, inclusive
    end: str                           # last UTC day, inclusive
    total: UsageTotals
    by_model: dict[str, UsageTotals]
    days: list[UsageDay]               # every day of the range, oldest first (zeros included)
    quota: dict[str, int] = {}         # the key's quotas (app/quota.py), {} without one
