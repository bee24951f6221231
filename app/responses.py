"""What the routes answer with, shared by the images and jobs routes: job links, image URLs
(signed, or the object store's presigned ones), the error responses every job route documents,
and the OpenAI-style answer of the synchronous endpoints (generations and edits)."""
from __future__ import annotations

import base64

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from latentd.app import signing
from latentd.app.errors import ApiError, error_body
from latentd.app.schemas import ErrorResponse
from latentd.app.state import state_of
from latentd.jobs.usage import usage

# 403: a bad signed URL, or a request field the key is not permitted (moderation "low")
ERRORS = {401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          422: {"model": ErrorResponse}}
NO_RETRY = {"x-should-retry": "false"}     # the openai client must not resubmit these


_BASES: dict[tuple, str] = {}       # what request.base_url is, by what it is made of (bounded)


def base_url(request: Request) -> str:
    public = state_of(request).settings.public_url
    if public:
        return public.rstrip("/")
    scope = request.scope
    server = scope.get("server")
    key = (scope.get("scheme"), tuple(server) if server else None, scope.get("root_path"),
           scope.get("app_root_path"), request.headers.get("host"))
    url = _BASES.get(key)
    if url is None:             # Starlette parses the URL anew each time: once per host here
        url = str(request.base_url).rstrip("/")
        if len(_BASES) < 64:
            _BASES[key] = url
    return url


def image_url(request: Request, owner: str, job_id: str, k: int) -> str:
    """Our signed URL, or the object store's presigned one (LATENTD_S3_PRESIGN=true)."""
    st = state_of(request)
    if st.settings.storage == "s3" and st.settings.s3_presign:
        return st.jobs.presigned_url(job_id, k, st.settings.url_ttl_s)
    return base_url(request) + signing.signed_path(st.secret, owner, job_id, k, st.settings.url_ttl_s)


def image_fields(spec) -> dict:
    """What OpenAI's answers (and stream events) say of the images: size, quality, background,
    output_format, from the job's resolved spec (latentd draws opaque images only)."""
    return {"size": f"{spec.width}x{spec.height}", "quality": spec.quality, "background": "opaque",
            "output_format": spec.output_format}


def links(request: Request, job_id: str) -> dict:
    me = f"{base_url(request)}/v1/jobs/{job_id}"
    return {"self": me, "cancel": me}


async def sync_result(request: Request, owner: str, job_id: str, spec, response_format: str) -> JSONResponse:
    """Wait for an admitted job and answer as OpenAI's images API does (generations and edits).
    Past LATENTD_SYNC_WAIT_S: 504 with the job id to poll."""
    st = state_of(request)
    jobs = st.jobs
    d = await anyio.to_thread.run_sync(jobs.wait, job_id, owner, st.settings.sync_wait_s,
                                       limiter=st.waits())
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
    return JSONResponse({"created": int(d.get("created_at") or 0), "data": data, **image_fields(spec),
                         "usage": usage(d["images"], (d.get("usage") or {}).get("compute_seconds", 0.0))})
