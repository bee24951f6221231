"""`stream: true` on POST /v1/images/generations: OpenAI's Images API event stream.

Events (text/event-stream, each `event:` named as its `type`), as the official clients parse them:
  image_generation.partial_image  {b64_json, partial_image_index, created_at, size, quality,
                                   background, output_format}   at most `partial_images` per image
  image_generation.completed      {b64_json, created_at, size, quality, background, output_format,
                                   usage}                        one per image, as it is stored
                                   (usage: that image's, jobs/usage.py; its input counted in full)
plus latentd's fields (index, seed, nsfw, job_id), and on failure an `error` event whose data
{"error": {...}} the clients raise as an API error; past LATENTD_SYNC_WAIT_S, as the
non-streaming answer's 504, an `error` event with code `timeout` and the job id to poll. A partial image is the coarse preview of
model/preview.py (a colour mosaic of the x0 estimate, at most PREVIEW_CELLS cells a side),
scaled to the image size: never a decoded image, since the safety check only runs at the end.
"""
from __future__ import annotations

import base64
import io
import time

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from latentd.app.admission import admit
from latentd.app.events import PING, SSE_HEADERS, follow, sse
from latentd.app.responses import image_fields
from latentd.app.state import state_of
from latentd.jobs import events
from latentd.jobs.usage import usage


def scaled_preview(b64_png: str, width: int, height: int, fmt: str = "png") -> str:
    """A preview's few cells scaled to the image size (bilinear: a blur, not blocks), base64, in
    the job's output format (png | jpeg | webp), as the event's output_format says."""
    from PIL import Image

    im = Image.open(io.BytesIO(base64.b64decode(b64_png))).convert("RGB")
    buf = io.BytesIO()
    extra = {"compress_level": 1} if fmt == "png" else {"quality": 90}
    im.resize((width, height), Image.BILINEAR).save(buf, format=fmt.upper(), **extra)
    return base64.b64encode(buf.getvalue()).decode()


async def respond(request: Request, body, owner: str) -> StreamingResponse:
    st = state_of(request)
    n_partial = body.partial_images or 0
    listener = events.new_listener()
    every = {}

    def watch(spec):
        every["k"] = events.preview_every(spec.run_steps, n_partial)
        return listener, every["k"]

    job_id, spec = admit(st, body, owner, "images", watch=watch)
    fields = image_fields(spec)         # size, quality, background, output_format
    wait_s = st.settings.sync_wait_s
    deadline = time.monotonic() + wait_s

    async def stream():
        partials: dict[int, int] = {}
        async for _, type_, data in follow(st, job_id, owner, None, every["k"], listener, deadline):
            if type_ == "ping":
                yield PING
            elif type_ == "timeout":                 # as the non-streaming answer's 504
                d = st.jobs.get(job_id, owner) or {}
                yield sse("error", {"type": "error", "error": {
                    "code": "timeout", "message": f"the job is still {d.get('status', 'running')} "
                    f"after {wait_s:g} s; poll GET /v1/jobs/{job_id}", "type": "timeout_error",
                    "param": None, "job_id": job_id}})
                return
            elif type_ == "preview":
                k = data["index"]
                i = partials.get(k, 0)
                if i >= n_partial:
                    continue
                partials[k] = i + 1
                b64 = await anyio.to_thread.run_sync(scaled_preview, data["png"], spec.width, spec.height,
                                                     spec.output_format)
                yield sse("image_generation.partial_image", {
                    "type": "image_generation.partial_image", "b64_json": b64,
                    "partial_image_index": i, "created_at": int(time.time()), **fields,
                    "index": k, "seed": spec.seed + k,
                    "job_id": job_id})
            elif type_ == "image":
                k = data["index"]
                image = st.jobs.image_bytes(job_id, k, owner) or b""
                yield sse("image_generation.completed", {
                    "type": "image_generation.completed", "b64_json": base64.b64encode(image).decode(),
                    "created_at": int(time.time()), **fields,
                    "usage": usage([data], (data.get("usage") or {}).get("compute_seconds", 0.0)),
                    "index": k, "seed": data["seed"], "nsfw": bool(data.get("nsfw")),
                    "revised_prompt": spec.prompt, "job_id": job_id})
            elif type_ in ("failed", "canceled", "error"):
                d = st.jobs.get(job_id, owner) or {}
                err = d.get("error") or data or {}
                yield sse("error", {"type": "error", "error": {
                    "code": err.get("code", type_), "message": err.get("message", f"the job {type_}"),
                    "type": "server_error" if type_ == "failed" else "invalid_request_error",
                    "param": None, "job_id": job_id}})
                return

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
