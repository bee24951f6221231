"""A job's event stream, as a Redis stream (torch-free; the worker writes, the API follows).

Entries of keys.events(id), each with a `type` and an optional JSON `data`:

  running   {step, total, eta_s[, attempt]}    a worker claimed the job (attempt: again after a
                                               requeue), then progress: steps done over all
                                               images and an estimate of the seconds left
  preview   {index, step, total, width, height, png}   a coarse preview of image `index`: a PNG of
                                               at most model.preview.PREVIEW_CELLS cells a side,
                                               base64 (width x height: the final image's size)
  image     {index, seed, nsfw, ...}           image `index` was stored (written by the IMAGE script)
  succeeded | failed | canceled                the end (written by end_job in jobs/state.py)

Lifecycle entries (the claim, images, the end) are always written: they are few. Progress and
previews are written only while someone listens: a listener registers in keys.watch(id) with the
preview interval it wants (every k steps), and the worker reads that set when it claims a job and
at each progress write. The stream's entry ids are the SSE event ids, so `Last-Event-ID` resumes
with XREAD after it; the stream is capped at about MAXLEN entries (a watched job of 16 images x
150 steps with a preview every step stays under it; beyond, the oldest previews go first, and the
images and the end, written last, stay) and expires with the record.
"""
from __future__ import annotations

import json
import uuid

from latentd.jobs import keys

MAXLEN = 4000              # entries kept per job (approximate trimming; see below)
WATCH_TTL_S = 30           # a listener refreshes its registration at least this often
MAX_PREVIEW_EVERY = 100    # bounds of a listener's preview interval (steps); 0 = no previews
DEFAULT_PREVIEW_EVERY = 5


def add(pipe, job_id: str, type_: str, data: dict, ttl_s: int) -> None:
    """Queue one XADD (+ EXPIRE) on a Redis pipeline or client."""
    key = keys.events(job_id)
    pipe.xadd(key, {"type": type_, "data": json.dumps(data, separators=(",", ":"))},
              maxlen=MAXLEN, approximate=True)
    pipe.expire(key, ttl_s)


def parse(fields: dict) -> tuple[str, dict]:
    """(type, data) of a stream entry's fields (bytes or str)."""
    f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
         for k, v in fields.items()}
    data = json.loads(f["data"]) if f.get("data") else {}
    return f.get("type", ""), data


def new_listener() -> str:
    return uuid.uuid4().hex[:16]


def watch(redis, job_id: str, listener: str, every: int) -> None:
    """Register (or refresh) a listener of job_id wanting a preview every `every` steps (0: none)."""
    pipe = redis.pipeline(transaction=False)
    pipe.zadd(keys.watch(job_id), {listener: int(every)})
    pipe.expire(keys.watch(job_id), WATCH_TTL_S)
    pipe.execute()


def unwatch(redis, job_id: str, listener: str) -> None:
    redis.zrem(keys.watch(job_id), listener)


def watched(redis, job_ids: list[str]) -> dict[str, int]:
    """job id -> the smallest preview interval its listeners asked for (0: progress only), for
    the jobs that someone listens to; one round trip."""
    if not job_ids:
        return {}
    pipe = redis.pipeline(transaction=False)
    for j in job_ids:
        pipe.zrange(keys.watch(j), 0, -1, withscores=True)
    out = {}
    for j, rows in zip(job_ids, pipe.execute()):
        if rows:
            wanted = [int(score) for _, score in rows if score > 0]
            out[j] = min(wanted) if wanted else 0
    return out


def preview_every(steps: int, partial_images: int) -> int:
    """The interval that gives at most `partial_images` previews before the last step of
    `steps` (OpenAI's partial_images): previews at every-th steps, never at the last."""
    if partial_images <= 0:
        return 0
    return max(1, -(-steps // (partial_images + 1)))
