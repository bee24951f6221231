"""POST /v1/images/generations: OpenAI-compatible, synchronous (submit, then wait). Past
LATENTD_SYNC_WAIT_S it answers 504 with the job id to poll (and `x-should-retry: false`, so the
openai client does not resubmit). With `stream: true`: OpenAI's event stream (app/openai_stream.py)."""
from __future__ import annotations

import base64

import anyio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from latentd.app import openai_stream
from latentd.app.admission import admit
from latentd.app.deps import owner_of
from latentd.app.errors import ApiError, error_body
from latentd.app.routes.jobs import ERRORS, image_url, links
from latentd.app.schemas import GENERATION_BODY, ErrorResponse, ImagesResponse, parse_generation_request

router = APIRouter(prefix="/v1/images", tags=["images"])
NO_RETRY = {"x-should-retry": "false"}


def _wait_limiter(st) -> anyio.CapacityLimiter:
    """Sync waits get their own thread budget: hundreds of clients waiting for their images must
    not take the default pool's threads that /readyz, /v1/models and /metrics run on (600 waiters
    kept /v1/models waiting 35 s)."""
    if getattr(st, "wait_limiter", None) is None:
        st.wait_limiter = anyio.CapacityLimiter(256)
    return st.wait_limiter


@router.post("/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             openapi_extra=GENERATION_BODY,
             responses={**ERRORS, 200: {"content": {"text/event-stream": {}},
                                        "description": "JSON, or with `stream: true` OpenAI's "
                                                       "image_generation.* events"},
                        400: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                        429: {"model": ErrorResponse}, 503: {"model": ErrorResponse},
                        504: {"model": ErrorResponse}})
async def generate(request: Request):
    st = request.app.state
    owner = owner_of(request)
    body = parse_generation_request(await request.body())
    if body.stream:
        return await openai_stream.respond(request, body, owner)
    job_id, spec = admit(st, body, owner, "images")
    return await sync_result(request, owner, job_id, spec, body.response_format)


async def sync_result(request: Request, owner: str, job_id: str, spec, response_format: str) -> JSONResponse:
    """Wait for an admitted job and answer as OpenAI's images API does (generations and edits)."""
    st = request.app.state
    jobs = st.jobs
    d = await anyio.to_thread.run_sync(jobs.wait, job_id, owner, st.settings.sync_wait_s,
                                       limiter=_wait_limiter(st))
    if d is None:
        raise ApiError(404, "not_found", "the job disappeared", "job_id")
    if d["status"] in ("queued", "running"):
        err = error_body("timeout", f"the job is still {d['status']} after {st.settings.sync_wait_s:g} s; "
                                    f"poll GET /v1/jobs/{job_id}", kind="timeout_error")
        err["error"].update(job_id=job_id, links=links(request, job_id))
        return JSONResponse(err, status_code=504, headers=NO_RETRY)
    if d["status"] != "succeeded":
        e = d.get("error") or {"code": d["status"], "message": f"the job was {d['status']}"}
        status = 409 if d["status"] == "canceled" else 422 if e.get("code") == "invalid_request" else 502
        body_ = error_body(e.get("code", "failed"), e.get("message", ""), e.get("field"),
                           kind="server_error" if status == 502 else "invalid_request_error")
        body_["error"]["job_id"] = job_id
        return JSONResponse(body_, status_code=status, headers=NO_RETRY)
    data = []
    for im in d["images"]:
        item = {"revised_prompt": spec.prompt, "seed": im["seed"], "nsfw": bool(im.get("nsfw"))}
        if response_format == "b64_json":
            image = jobs.image_bytes(job_id, im["index"], owner)
            item["b64_json"] = base64.b64encode(image or b"").decode()
        else:
            item["url"] = image_url(request, owner, job_id, im["index"])
        data.append(item)
    return JSONResponse({"created": int(d.get("created_at") or 0), "data": data,
                         "output_format": spec.output_format})
