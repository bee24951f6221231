"""The async job API: submit (202), status, image bytes, cancel. A job belongs to the key that
made it; any other key gets 404 on every route that takes its id.

Handlers are `async` and call Redis inline: each is one or two round trips to a local Redis
(short socket timeouts, see app.state.make_redis), which costs less than a thread-pool hop; only
the long wait of the sync endpoint runs in the thread pool."""
from __future__ import annotations

import base64
import binascii
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from latentd.app import idempotency, signing
from latentd.app.admission import admit
from latentd.app.deps import JobsDep, OwnerDep, StateDep, TokenDep, owner_of, token_of
from latentd.app.errors import ApiError, too_large
from latentd.app.events import PING, SSE_HEADERS, follow, parse_last_event_id, sse
from latentd.app.responses import ERRORS, image_url, links
from latentd.app.schemas import (JOB_BODY, ErrorResponse, JobCreated, JobList, JobRequest, JobStatus,
                         parse_generation_request)
from latentd.app.state import state_of
from latentd.app.uploads import is_multipart, read_edit_form
from latentd.jobs.events import DEFAULT_PREVIEW_EVERY, MAX_PREVIEW_EVERY
from latentd.jobs.keys import RECENT_MAX
from latentd.jobs.encode import MEDIA_TYPES, media_type
from latentd.jobs.state import TERMINAL

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
NOT_FOUND = "no such job"


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
    return {"id": d["id"], "kind": d.get("kind", "text"), "status": d["status"], "queue_position": d.get("queue_position"),
            "progress": d.get("progress") or {}, "timings": timings, "images": images,
            "error": d.get("error"), "usage": d.get("usage") or {}, "params": d.get("params") or {},
            "attempts": d.get("attempts", 0), "resumed_from_step": d.get("resumed_from_step"),
            "links": lk}


def _b64(value: str | None, field: str) -> bytes | None:
    """An image sent in JSON: base64, optionally as a data: URL."""
    if value is None:
        return None
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_value", f"{field}: not valid base64", field,
                       "a base64 PNG, JPEG or WebP file") from None


@router.post("", status_code=202, response_model=JobCreated,
             openapi_extra={**JOB_BODY, "parameters": [idempotency.PARAMETER]},
             responses={**ERRORS, 200: {"model": JobCreated, "headers": idempotency.REPLAY_HEADER_DOC,
                                        "description": "a replay: the job of an earlier request "
                                                       "with the same Idempotency-Key"},
                        400: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                        413: {"model": ErrorResponse},
                        429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def submit_job(request: Request):
    """Admit a job (202) and return its id and links; poll `links.self`. JSON (an edit carries
    `image`, and `mask`, in base64) or multipart with the fields of /v1/images/edits. Hot path:
    the key, then the raw body are checked here directly (no per-request dependency solving)."""
    st = state_of(request)
    owner = owner_of(request)
    if is_multipart(request):
        body, image, mask = await read_edit_form(request)
    else:
        raw = await request.body()
        # only bodies that carry images get the edit bound (LATENTD_MAX_EDIT_BODY_BYTES): a larger
        # one without the "image" key is refused unparsed, and again if it parses to no image
        small = len(raw) <= st.settings.max_body_bytes
        if not small and b'"image"' not in raw:
            raise too_large(st.settings.max_body_bytes)
        body = parse_generation_request(raw, JobRequest)
        image, mask = _b64(body.image, "image"), _b64(body.mask, "mask")
        if image is None and mask is None and not small:
            raise too_large(st.settings.max_body_bytes)
    with idempotency.scope(request, owner) as idem:
        if image is None and mask is None:
            job_id, _ = admit(st, body, owner, "jobs")
        else:
            job_id, _ = await anyio.to_thread.run_sync(admit, st, body, owner, "jobs", image, mask)
    lk = links(request, job_id)
    if idem is not None and idem.replayed:      # the first request's job, as it is now
        d = st.jobs.get(job_id, owner)
        return JSONResponse({"id": job_id, "status": d["status"] if d else "queued", "links": lk},
                            status_code=200, headers={"Location": lk["self"],
                                                      **idempotency.replay_headers(idem)})
    return JSONResponse({"id": job_id, "status": "queued", "links": lk}, status_code=202,
                        headers={"Location": lk["self"]})


@router.get("", response_model=JobList, responses=ERRORS)
async def list_jobs(request: Request, owner: OwnerDep, jobs: JobsDep,
                    limit: Annotated[int, Query(ge=1, le=RECENT_MAX, description="at most this many")] = 20):
    """This key's most recent jobs, newest first (those not yet expired)."""
    return {"object": "list", "data": [job_view(request, owner, d) for d in jobs.recent(owner, limit)]}


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


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def job_events(request: Request, job_id: str, owner: OwnerDep, jobs: JobsDep,
                     preview_every: Annotated[int, Query(
                         ge=0, le=MAX_PREVIEW_EVERY,
                         description="a preview every k steps (0: none)")] = DEFAULT_PREVIEW_EVERY,
                     last_event_id: Annotated[str | None, Header(
                         alias="Last-Event-ID", max_length=64,
                         description="resume after this event id")] = None):
    """Server-Sent Events until the job ends: `queued` {position}, `running` {step, total,
    eta_s}, `preview` {index, step, total, width, height, png: a coarse base64 PNG}, `image`
    {index, seed, nsfw, url} as each image is stored, then `succeeded`, `failed` or `canceled`
    with the job (as GET /v1/jobs/{id}). Every event but `queued` has an id; send the last one
    as Last-Event-ID to resume without loss."""
    if jobs.get(job_id, owner) is None:
        raise ApiError(404, "not_found", NOT_FOUND, "job_id")
    after = parse_last_event_id(last_event_id)
    st = state_of(request)

    async def stream():
        yield b"retry: 2000\n\n"
        async for id_, type_, data in follow(st, job_id, owner, after, preview_every):
            if type_ == "ping":
                yield PING
                continue
            if type_ == "image":
                data = {"index": data["index"], "seed": data["seed"], "nsfw": bool(data.get("nsfw")),
                        "url": image_url(request, owner, job_id, data["index"])}
            elif type_ in TERMINAL:
                d = jobs.get(job_id, owner)
                data = job_view(request, owner, d) if d else {"id": job_id, "status": type_}
            yield sse(type_, data, id_)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/{job_id}/images/{k}", response_class=Response,
            responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, **ERRORS,
                       403: {"model": ErrorResponse}})
async def get_image(request: Request, job_id: str, k: int, st: StateDep, _token: TokenDep,
              o: Annotated[str | None, Query(max_length=200, description="owner (signed URLs)")] = None,
              exp: Annotated[str | None, Query(max_length=20, description="expiry (signed URLs)")] = None,
              sig: Annotated[str | None, Query(max_length=100, description="signature (signed URLs)")] = None):
    """The image (PNG, or the job's output_format) with an Authorization header, or with a valid
    signature (no header needed)."""
    if token_of(request) is not None or (o is None and exp is None and sig is None):
        owner = owner_of(request)
    elif signing.verify(st.secret, o, job_id, k, exp, sig):
        owner = o
    else:
        raise ApiError(403, "bad_signature", "the signed URL is invalid or has expired", "sig")
    if k < 0:
        image = None
    elif st.settings.storage == "redis":
        image = st.jobs.image_bytes(job_id, k, owner)    # one local round trip: inline
    else:                                                # a file or an object store: off the loop
        image = await anyio.to_thread.run_sync(st.jobs.image_bytes, job_id, k, owner)
    if image is None:
        raise ApiError(404, "not_found", "no such image", "k")
    return Response(image, media_type=media_type(image),
                    headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})
