"""POST /v1/images/edits: OpenAI-compatible image edits (multipart), synchronous like
/v1/images/generations. `image` (or `image[]`: one image) is PNG/JPEG/WebP; `mask` a PNG whose
transparent pixels mark the region to repaint (OpenAI's rule), or a grayscale mask (white =
repaint). Without a mask the edit is img2img (SDEdit): `strength` says how much of the schedule
runs. The same form is accepted by POST /v1/jobs (asynchronous)."""
from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from latentd.app.admission import admit
from latentd.app.deps import owner_of
from latentd.app.errors import ApiError
from latentd.app.routes.images import sync_result
from latentd.app.routes.jobs import ERRORS
from latentd.app.schemas import EDIT_BODY, ErrorResponse, ImagesEditForm, ImagesResponse, parse_edit_form

router = APIRouter(prefix="/v1/images", tags=["images"])
UPLOAD_PATHS = ("/v1/images/edits", "/v1/jobs")     # bodies that may carry images (edit body bound)
IMAGE_FIELDS = ("image", "image[]")
FILE = "a PNG, JPEG or WebP file"


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def _file(value, field: str) -> bytes:
    if not isinstance(value, UploadFile):
        raise ApiError(422, "invalid_value", f"{field}: must be a file upload, not a text field", field, FILE)
    return await value.read()


async def read_edit_form(request: Request) -> tuple[ImagesEditForm, bytes, bytes | None]:
    """(fields, image bytes, mask bytes or None) of a multipart edit. Raises ApiError: 400 for a
    body that is not multipart, 422 naming the field otherwise."""
    if not is_multipart(request):
        raise ApiError(400, "invalid_body", "request body must be multipart/form-data (as OpenAI's "
                                            "images.edit sends it)", "body", "multipart/form-data")
    try:
        form = await request.form(max_files=4, max_fields=64, max_part_size=1 << 20)
    except Exception as e:  # noqa: BLE001 - starlette raises HTTPException / MultiPartException
        detail = getattr(e, "detail", None) or getattr(e, "message", None) or type(e).__name__
        raise ApiError(400, "invalid_body", f"multipart body could not be read: {detail}", "body",
                       "multipart/form-data") from None
    try:
        fields: dict[str, str] = {}
        images, masks = [], []
        for k, v in form.multi_items():
            if k in IMAGE_FIELDS:
                images.append(v)
            elif k == "mask":
                masks.append(v)
            elif not isinstance(v, str):
                raise ApiError(422, "invalid_value", f"{k}: must be a text field, not a file", k, "text")
            elif k in fields:
                raise ApiError(422, "invalid_value", f"{k}: given more than once", k, "one value")
            else:
                fields[k] = v
        req = parse_edit_form(fields)
        if not images:
            raise ApiError(422, "missing_field", f"image: field required ({FILE})", "image", FILE)
        if len(images) > 1:
            raise ApiError(422, "invalid_value", f"image: one image per edit, got {len(images)}",
                           "image", {"max_items": 1})
        if len(masks) > 1:
            raise ApiError(422, "invalid_value", f"mask: at most one mask, got {len(masks)}", "mask",
                           {"max_items": 1})
        image = await _file(images[0], "image")
        mask = await _file(masks[0], "mask") if masks else None
    finally:
        await form.close()
    return req, image, mask


@router.post("/edits", response_model=ImagesResponse, response_model_exclude_none=True,
             openapi_extra=EDIT_BODY,
             responses={**ERRORS, 400: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                        413: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                        502: {"model": ErrorResponse}, 503: {"model": ErrorResponse},
                        504: {"model": ErrorResponse}})
async def edit(request: Request):
    st = request.app.state
    owner = owner_of(request)
    req, image, mask = await read_edit_form(request)
    # decoding and checking the uploads is CPU work: off the event loop
    job_id, spec = await anyio.to_thread.run_sync(admit, st, req, owner, "edits", image, mask)
    return await sync_result(request, owner, job_id, spec, req.response_format)
