"""The async job API: submit (202), status, image bytes, cancel. A job belongs to the key that
made it; any other key gets 404 on every route that takes its id.

Handlers are `async` and call Redis inline: each is one or two round trips to a local Redis
(short socket timeouts, see app.main.make_redis), which costs less than a thread-pool hop; only
the long wait of the sync endpoint runs in the thread pool."""
from __future__ import annotations

from typing import Annotated

import anyio

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from app import signing
from app.admission import admit
from app.deps import CredsDep, JobsDep, OwnerDep, owner_of, owner_of_request
from app.errors import ApiError
from app.schemas import (GENERATION_BODY, ErrorResponse, JobCreated, JobStatus,
                         parse_generation_request)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
NOT_FOUND = "no such job"
ERRORS = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}


def base_url(request: Request) -> str:
    return (request.app.state.settings.public_url or str(request.base_url)).rstrip("/")


def image_url(request: Request, owner: str, job_id: str, k: int) -> str:
    """Our signed URL, or the object store's presigned one (LATENTD_S3_PRESIGN=true)."""
    st = request.app.state
    if st.settings.storage == "s3" and st.settings.s3_presign:
        return st.jobs.store.presigned_url(job_id, k, st.settings.url_ttl_s)
    return base_url(request) + signing.signed_path(st.secret, owner, job_id, k, st.settings.url_ttl_s)


def links(request: Request, job_id: str) -> dict:
    me = f"{base_url(request)}/v1/jobs/{job_id}"
    return {"self": me, "cancel": me}


def job_view(request: Request, owner: str, d: dict) -> dict:
    """The job dict from JobClient plus links, signed image URLs and timings."""
    created, started, finished = d.get("created_at"), d.get("started_at"), d.get("finished_at")
    timings = {"created_at": created, "started_at": started, "finished_at": finished,
               "queued_s": round(started - created, 6) if started and created else None,
               "run_s": round(finished - started, 6) if finished and started else None}
    images = [{"index": im["index"], "seed": im["seed"], "nsfw": bool(im.get("nsfw")),
               "url": image_url(request, owner, d["id"], im["index"])} for im in d.get("images", [])]
    lk = links(request, d["id"])
    lk["images"] = [im["url"] for im in images]
    return {"id": d["id"], "status": d["status"], "queue_position": d.get("queue_position"),
            "progress": d.get("progress") or {}, "timings": timings, "images": images,
            "error": d.get("error"), "usage": d.get("usage") or {}, "params": d.get("params") or {},
            "links": lk}


@router.post("", status_code=202, response_model=JobCreated, openapi_extra=GENERATION_BODY,
             responses={**ERRORS, 400: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                        429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def submit_job(request: Request):
    """Admit a job (202) and return its id and links; poll `links.self`. Hot path: the key, then
    the raw body are checked here directly (no per-request dependency solving)."""
    owner = owner_of_request(request)
    body = parse_generation_request(await request.body())
    job_id, _ = admit(request.app.state, body, owner, "jobs")
    lk = links(request, job_id)
    return JSONResponse({"id": job_id, "status": "queued", "links": lk}, status_code=202,
                        headers={"Location": lk["self"]})


@router.get("/{job_id}", response_model=JobStatus, responses=ERRORS)
async def get_job(request: Request, job_id: str, owner: OwnerDep, jobs: JobsDep):
    d = jobs.get(job_id, owner)
    if d is None:
        raise ApiError(404, "not_found", NOT_FOUND, "job_id")
    return job_view(request, owner, d)


@router.delete("/{job_id}", response_model=JobStatus, responses=ERRORS)
async def cancel_job(request: Request, job_id: str, owner: OwnerDep, jobs: JobsDep):
    d = jobs.cancel(job_id, owner)
    if d is None:
        raise ApiError(404, "not_found", NOT_FOUND, "job_id")
    return job_view(request, owner, d)


@router.get("/{job_id}/images/{k}", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, **ERRORS, 403: {"model": ErrorResponse}})
async def get_image(request: Request, job_id: str, k: int, jobs: JobsDep, creds: CredsDep,
              o: Annotated[str | None, Query(max_length=200, description="owner (signed URLs)")] = None,
              exp: Annotated[str | None, Query(max_length=20, description="expiry (signed URLs)")] = None,
              sig: Annotated[str | None, Query(max_length=100, description="signature (signed URLs)")] = None):
    """image/png with an Authorization header, or with a valid signature (no header needed)."""
    if creds is not None or (o is None and exp is None and sig is None):
        owner = owner_of(request, creds)
    elif signing.verify(request.app.state.secret, o, job_id, k, exp, sig):
        owner = o
    else:
        raise ApiError(403, "bad_signature", "the signed URL is invalid or has expired", "sig")
    if k < 0:
        png = None
    elif request.app.state.settings.storage == "redis":
        png = jobs.image_png(job_id, k, owner)           # one local round trip: inline
    else:                                                # a file or an object store: off the loop
        png = await anyio.to_thread.run_sync(jobs.image_png, job_id, k, owner)
    if png is None:
        raise ApiError(404, "not_found", "no such image", "k")
    return Response(png, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})
