"""POST /v1/images/generations: OpenAI-compatible, synchronous (submit, then wait). Past
LATENTD_SYNC_WAIT_S it answers 504 with the job id to poll (and `x-should-retry: false`, so the
openai client does not resubmit; app/responses.py sync_result). With `stream: true`: OpenAI's
event stream (app/openai_stream.py)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from latentd.app import idempotency, openai_stream
from latentd.app.admission import admit
from latentd.app.deps import owner_of
from latentd.app.responses import ERRORS, sync_result
from latentd.app.schemas import GENERATION_BODY, ErrorResponse, ImagesResponse, parse_generation_request
from latentd.app.state import state_of

router = APIRouter(prefix="/v1/images", tags=["images"])


@router.post("/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             openapi_extra={**GENERATION_BODY, "parameters": [idempotency.PARAMETER]},
             responses={**ERRORS, 200: {"content": {"text/event-stream": {}},
                                        "description": "JSON, or with `stream: true` OpenAI's "
                                                       "image_generation.* events",
                                        "headers": idempotency.REPLAY_HEADER_DOC},
                        400: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                        413: {"model": ErrorResponse},
                        429: {"model": ErrorResponse}, 503: {"model": ErrorResponse},
                        504: {"model": ErrorResponse}})
async def generate(request: Request):
    st = state_of(request)
    owner = owner_of(request)
    body = parse_generation_request(await request.body())
    with idempotency.scope(request, owner) as idem:
        if body.stream:
            return await openai_stream.respond(request, body, owner)
        job_id, spec = admit(st, body, owner, "images")
    resp = await sync_result(request, owner, job_id, spec, body.response_format)
    resp.headers.update(idempotency.replay_headers(idem))
    return resp

