"""AUTOMATIC1111's web API under /sdapi/v1 (the subset applications use), as a thin translation
onto latentd: a txt2img/img2img body becomes the JobRequest of POST /v1/jobs (app/a1111/) and
goes through the same admission, queue, workers, rate limits and metrics, so the same request
through /sdapi and /v1 gives the same image and both batch together.

Errors keep A1111's shape where clients read it: a 401 is {"detail": "Not authenticated"} with
`WWW-Authenticate: Basic`; every other rejection is {"detail": message, "error": latentd's error
(field, allowed)}. Auth is the API key as a Bearer token or as the password of HTTP Basic.
"""
from __future__ import annotations

import base64
import json
import os
import time
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic

from latentd.app import loras as lora_list, metrics
from latentd.app.a1111 import infotext, masks, names, only_masked, prefs, translate
from latentd.app.a1111.schemas import (Img2ImgRequest, ImagesResponse, PNGInfoRequest, PNGInfoResponse,
                                       ProgressResponse, SamplerItem, SchedulerItem, ScriptsList, SDModelItem,
                                       SdError, Txt2ImgRequest)
from latentd.app.admission import admit
from latentd.app.deps import bearer_scheme, owner_of
from latentd.app.errors import ApiError, _json_safe, error_body, error_from
from latentd.app.state import state_of
from latentd.jobs import events, keys
from latentd.jobs.request import Limits
from latentd.model import lora_catalog

UPLOAD_PATHS = ("/sdapi/v1/img2img", "/sdapi/v1/png-info")   # bodies that may carry images
ACTIVE = ("queued", "running")


def error_response(e: ApiError) -> JSONResponse:
    metrics.rejected(e.status, e.code)
    if e.status == 401:
        return JSONResponse({"detail": "Not authenticated"}, status_code=401,
                            headers={"WWW-Authenticate": "Basic"})
    err = error_body(e.code, e.message, e.field, e.allowed,
                     "invalid_request_error" if e.status < 500 else "server_error")["error"]
    return JSONResponse({"detail": e.message, "error": err}, status_code=e.status, headers=e.headers)


class SdapiRoute(APIRoute):
    """Renders this router's rejections (auth, validation, admission) in A1111's shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def run(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                return error_response(error_from(list(e.errors()), model=None))
            except ApiError as e:
                return error_response(e)

        return run


class _BasicScheme(HTTPBasic):
    """Declares HTTP Basic in the OpenAPI document; the header is read by deps.owner_of."""

    async def __call__(self, request: Request):
        return None


basic_scheme = _BasicScheme(auto_error=False, description="any user name; the password is an API key")


async def _owner(request: Request, _basic=Depends(basic_scheme), _bearer=Depends(bearer_scheme)) -> str:
    return owner_of(request)


Owner = Annotated[str, Depends(_owner)]
router = APIRouter(prefix="/sdapi/v1", tags=["sdapi (AUTOMATIC1111)"], route_class=SdapiRoute)
ERRORS = {401: {"model": SdError}, 422: {"model": SdError}}
GENERATION_ERRORS = {**ERRORS, 400: {"model": SdError}, 413: {"model": SdError}, 429: {"model": SdError},
                     502: {"model": SdError}, 503: {"model": SdError}, 504: {"model": SdError}}


def _admit(st, req, owner: str, image: bytes | None, mask: bytes | None):
    try:
        return admit(st, req, owner, "sdapi", image, mask)
    except ApiError as e:
        raise translate.renamed(e) from None


async def _generate(request: Request, body, owner: str, img2img: bool) -> dict:
    st = state_of(request)
    model = prefs.check_overrides(body.override_settings, st.models) or prefs.current_model(st, owner)
    entry, info = st.models.pick(model)
    job_model = None if entry.name == st.models.default.name else entry.name
    req = translate.to_job_request(body, info, job_model, Limits.from_settings(st.settings).max_n, img2img)
    paste = None
    if img2img:
        out_size = tuple(int(v) for v in req.size.split("x")) if req.size else None
        image, mask, paste = await anyio.to_thread.run_sync(masks.edit_inputs, body,
                                                            st.settings.max_image_pixels, out_size)
        job_id, spec = await anyio.to_thread.run_sync(_admit, st, req, owner, image, mask)
    else:
        job_id, spec = _admit(st, req, owner, None, None)
    d = await anyio.to_thread.run_sync(st.jobs.wait, job_id, owner, st.settings.sync_wait_s,
                                       limiter=st.waits())
    if d is None:
        raise ApiError(502, "job_lost", f"the job {job_id} disappeared", "job_id")
    if d["status"] in ACTIVE:
        raise ApiError(504, "timeout", f"the job is still {d['status']} after {st.settings.sync_wait_s:g} s; "
                       f"poll GET /v1/jobs/{job_id}", "job_id", job_id)
    if d["status"] == "failed":
        e = d.get("error") or {}
        status = 422 if e.get("code") == "invalid_request" else 502
        raise ApiError(status, e.get("code", "failed"), e.get("message", "the job failed"), e.get("field"))
    # succeeded, or canceled by /interrupt: the images done so far (A1111 answers an interrupted
    # generation the same way)
    images = []
    if body.send_images:
        def read():
            out = []
            for im in d["images"]:
                data = st.jobs.image_bytes(job_id, im["index"], owner) or b""
                if paste is not None and data:          # "only masked": the crop back in place
                    data = only_masked.paste(data, paste)
                out.append(base64.b64encode(data).decode())
            return out
        images = await anyio.to_thread.run_sync(read)
    sampler, scheduler = names.a1111_name(spec.sampler, spec.karras)
    params = body.model_dump()
    params.update(seed=spec.seed, sampler_name=sampler, scheduler=scheduler, steps=spec.steps,
                  cfg_scale=spec.guidance_scale, width=spec.width, height=spec.height,
                  override_settings={**(body.override_settings or {}), "sd_model_checkpoint": entry.name})
    if img2img:
        params.update(denoising_strength=spec.strength, init_images=None, mask=None)
    return {"images": images, "parameters": _json_safe(params),
            "info": json.dumps(infotext.info(spec, entry.name, body, spec.n))}


@router.post("/txt2img", response_model=ImagesResponse, responses=GENERATION_ERRORS)
async def txt2img(request: Request, body: Txt2ImgRequest, owner: Owner):
    """Text to image, synchronously (as A1111). Absent fields take the model's defaults."""
    return await _generate(request, body, owner, img2img=False)


@router.post("/img2img", response_model=ImagesResponse, responses=GENERATION_ERRORS)
async def img2img(request: Request, body: Img2ImgRequest, owner: Owner):
    """Image to image; with `mask`, inpainting (white = repaint)."""
    return await _generate(request, body, owner, img2img=True)


def _listener(owner: str) -> str:
    return "sdapi-" + owner


@router.get("/progress", response_model=ProgressResponse, responses=ERRORS)
async def progress(request: Request, owner: Owner,
                   skip_current_image: Annotated[bool, Query(description="no preview image")] = False):
    """The calling key's running job: its progress, an ETA, and (unless skip_current_image) a
    coarse preview of its current x0 estimate. Asking registers a listener, so the worker
    publishes previews while the key keeps polling (the first poll may have none yet)."""
    st = state_of(request)
    active = [d for d in st.jobs.recent(owner, 20) if d["status"] in ACTIVE]
    running = next((d for d in active if d["status"] == "running"), None)
    if running is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": {"job_count": len(active)}}
    every = 0 if skip_current_image else prefs.FIXED["show_progress_every_n_steps"]
    events.watch(st.redis, running["id"], _listener(owner), every)
    step, total = running["progress"].get("step", 0), running["progress"].get("total", 0)
    eta, preview = None, None
    for _id, fields in st.redis.xrevrange(keys.events(running["id"]), count=200):
        type_, data = events.parse(fields)
        if type_ == "running" and eta is None:
            eta = data.get("eta_s")
            if data.get("step", 0) > step:
                step, total = data["step"], data.get("total", total)
        elif type_ == "preview" and preview is None:
            preview = data.get("png")
        if eta is not None and (preview is not None or skip_current_image):
            break
    done = step / total if total else 0.0
    started = running.get("timings", {}).get("started_at") or running.get("started_at")
    if eta is None and started and done > 0:
        eta = (time.time() - started) * (1 - done) / done
    return {"progress": round(done, 4), "eta_relative": round(float(eta or 0.0), 3),
            "state": {"job": running["id"], "job_count": len(active), "sampling_step": step,
                      "sampling_steps": total,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(started or 0))},
            "current_image": None if skip_current_image else preview}


def _cancel_running(st, owner: str) -> list[str]:
    ids = [d["id"] for d in st.jobs.recent(owner, 50) if d["status"] == "running"]
    for job_id in ids:
        st.jobs.cancel(job_id, owner)
    return ids


@router.post("/interrupt", response_model=dict, responses=ERRORS)
async def interrupt(request: Request, owner: Owner):
    """Cancel the calling key's running job (its txt2img call answers with the images done)."""
    _cancel_running(state_of(request), owner)
    return {}


@router.post("/skip", response_model=dict, responses=ERRORS)
async def skip(request: Request, owner: Owner):
    """As /interrupt: latentd cannot skip one image of a batch, so the running job is canceled."""
    _cancel_running(state_of(request), owner)
    return {}


@router.get("/sd-models", response_model=list[SDModelItem], responses=ERRORS)
async def sd_models(request: Request, owner: Owner):
    """The deployment's models; `title` (= latentd's model name) is what sd_model_checkpoint takes."""
    return [{"title": e.name, "model_name": e.name, "filename": os.path.basename(os.path.normpath(e.source))}
            for e in state_of(request).models.entries]


@router.get("/samplers", response_model=list[SamplerItem], responses=ERRORS)
async def samplers(request: Request, owner: Owner):
    """A1111's names of the samplers latentd has (for the default model)."""
    st = state_of(request)
    info = st.models.info(st.models.default)
    available = None if info is None else info.samplers
    return [{"name": s.name, "aliases": list(s.aliases), "options": {"scheduler": "karras"} if s.karras else {}}
            for s in names.SAMPLERS if s.name in names.sampler_names(available)]


@router.get("/schedulers", response_model=list[SchedulerItem], responses=ERRORS)
async def schedulers(owner: Owner):
    return [{"name": n, "label": label, "aliases": None, "default_rho": 7.0 if n == "karras" else -1.0,
             "need_inner_model": False} for n, label in names.SCHEDULER_ITEMS]


@router.get("/loras", response_model=list[dict], responses=ERRORS)
def loras(request: Request, owner: Owner):
    """The LoRA adapters the calling key's model can use, in A1111's shape (`name` is what
    <lora:NAME:SCALE> takes; `path` is the file under its adapter folder)."""
    st = state_of(request)
    name = prefs.current_model(st, owner)
    entry = next(e for e in st.models.entries if e.name == name)
    return [{"name": lo.name, "alias": lo.name, "path": lo.name + lora_catalog.SUFFIX, "metadata": lo.meta}
            for lo in lora_list.usable(entry, st.models.info(entry), st.settings)]


@router.get("/upscalers", response_model=list[dict], responses=ERRORS)
async def upscalers(owner: Owner):
    return []


@router.get("/scripts", response_model=ScriptsList, responses=ERRORS)
async def scripts(owner: Owner):
    """No scripts or extensions (clients probe this to find ControlNet and the like)."""
    return {"txt2img": [], "img2img": []}


@router.get("/options", response_model=dict[str, Any], responses=ERRORS)
async def get_options(request: Request, owner: Owner):
    """sd_model_checkpoint (the calling key's default model) and the options clients read."""
    return prefs.options(state_of(request), owner)


@router.post("/options", response_model=None, responses=ERRORS)
async def set_options(request: Request, owner: Owner, body: Annotated[dict[str, Any], Body()]):
    """Set the calling key's default model (sd_model_checkpoint); other options are fixed."""
    prefs.set_options(state_of(request), owner, body)
    return None


@router.get("/cmd-flags", response_model=dict[str, Any], responses=ERRORS)
async def cmd_flags(owner: Owner):
    return {"api": True, "nowebui": True, "api_auth": None, "listen": True, "lora_dir": None,
            "ckpt_dir": None, "no_half": False, "medvram": False, "lowvram": False, "xformers": False}


@router.post("/png-info", response_model=PNGInfoResponse, responses={**ERRORS, 413: {"model": SdError}})
async def png_info(request: Request, body: PNGInfoRequest, owner: Owner):
    """The generation parameters in an image: A1111's `parameters` text (latentd writes one too),
    parsed, and the image's other text chunks (latentd's JSON under `latentd`)."""
    data = masks.b64_bytes(body.image, "image")
    try:
        text, items = await anyio.to_thread.run_sync(infotext.read, data)
    except Exception:  # noqa: BLE001 - any undecodable upload is the caller's 422
        raise ApiError(422, "invalid_value", "image: not a PNG, JPEG or WebP image", "image",
                       "a base64 PNG, JPEG or WebP file") from None
    return {"info": text, "items": items, "parameters": infotext.parse(text) if text else {}}
