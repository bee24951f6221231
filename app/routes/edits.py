"""POST /v1/images/edits: OpenAI-compatible image edits (multipart), synchronous like
/v1/images/generations. `image` (or `image[]`: one image) is PNG/JPEG/WebP; `mask` a PNG whose
transparent pixels mark the region to repaint (OpenAI's rule), or a grayscale mask (white =
repaint). Without a mask the edit is img2img (SDEdit): `strength` says how much of the schedule
runs. The same form (app/uploads.py) is accepted by POST /v1/jobs (asynchronous)."""
from __future__ import annotations

import anyio
from fastapi import APIRouter, Request

from latentd.app import idempotency
from latentd.app.admission import admit
from latentd.app.deps import owner_of
from latentd.app.responses import ERRORS, sync_result
from latentd.app.schemas import EDIT_BODY, ErrorResponse, ImagesResponse
from latentd.app.state import state_of
from latentd.app.uploads import read_edit_form

router = APIRouter(prefix="/v1/images", tags=["images"])


@router.post("/edits", response_model=ImagesResponse, response_model_exclude_none=True,
             openapi_extra={**EDIT_BODY, "parameters": [idempotency.PARAMETER]},
             responses={**ERRORS, 400: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                        413: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                        502: {"model": ErrorResponse}, 503: {"model": ErrorResponse},
                        504: {"model": ErrorResponse}})
async def edit(request: Request):
    st = state_of(request)
    owner = owner_of(request)
    req, image, mask = await read_edit_form(request)
    with idempotency.scope(request, owner) as idem:
        # decoding and checking the uploads is CPU work: off the event loop
        job_id, spec = await anyio.to_thread.run_sync(admit, st, req, owner, "edits", image, mask)
    resp = await sync_result(request, owner, job_id, spec, req.response_format)
    resp.headers.update(idempotency.replay_headers(idem))
    return resp
