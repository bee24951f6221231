"""Multipart image uploads: the form of POST /v1/images/edits (OpenAI's images.edit), which
POST /v1/jobs accepts too. One `image` (or `image[]`) file, at most one `mask` file, the other
fields as text (app/schemas.py parse_edit_form checks them)."""
from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile

from latentd.app.errors import ApiError
from latentd.app.schemas import ImagesEditForm, parse_edit_form

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
