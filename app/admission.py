"""Admission: route to the model (app/models.py: 422 for an unknown one) -> validate against it
(its adapters too: app/loras.py) -> a deadline the queue ahead makes unreachable (app/quota.py) -> per-key rate limit -> per-key
quota (app/quota.py) -> queue cap -> enqueued on that model's queue. Each step rejects early with a
4xx/503 and enqueues nothing. For a key without a quota the rate limit, cap and enqueue are one
Lua script (JobClient.submit), so an admission is one Redis round trip.
"""
from __future__ import annotations

import dataclasses
import functools
import uuid

from pydantic import ValidationError

from latentd.app import idempotency, loras, metrics
from latentd.app.errors import ApiError
from latentd.app.quota import check_deadline
from latentd.app.ratelimit import RateLimiter
from latentd.app.schemas import ImagesGenerationRequest, invalid, to_job_params
from latentd.model.errors import InvalidRequest
from latentd.jobs import webhooks
from latentd.jobs.client import NotReplicated, QueueFull, RateLimited
from latentd.jobs.spec import JobSpec


def check_delivery(req: ImagesGenerationRequest, settings) -> None:
    """How the result is delivered: a callback_url on the webhook allow-list, partial_images only
    with stream. Raises ApiError(422) naming the field."""
    if getattr(req, "partial_images", None) is not None and not getattr(req, "stream", False):
        raise ApiError(422, "invalid_value", "partial_images: applies only with stream: true",
                       "partial_images", {"min": 0, "max": 3, "requires": "stream: true"})
    callback_url = getattr(req, "callback_url", None)
    if callback_url is not None:
        problem = webhooks.url_problem(callback_url, settings.webhook_allow)
        if problem:
            raise ApiError(422, "invalid_value", f"callback_url: {problem}", "callback_url",
                           "an http(s) URL whose host is on the server's webhook allow-list")


def check_moderation(state, owner: str, moderation: str) -> None:
    """moderation "low" only for a key permitted it (the keys file, app/auth.py PERMISSIONS):
    else 403 naming the field. With auth off there is no key to permit it."""
    if moderation == "low" and not (state.keys is not None and state.keys.permits(owner, "moderation_low")):
        raise ApiError(403, "permission_denied", 'moderation: "low" is not permitted for this API key '
                       "(an operator allows it: `latentd keys create NAME --allow-moderation-low`)",
                       "moderation", ["auto"])


def check_priority(state, owner: str, priority: str) -> None:
    """A priority above the key's cap (app/auth.py KeyStore.max_priority): 403 naming the field
    and the priorities the key may use. With auth off there is no key and no cap."""
    from latentd.app.auth import PRIORITY_ORDER

    if state.keys is None:
        return
    cap = state.keys.max_priority(owner)
    allowed = list(PRIORITY_ORDER[PRIORITY_ORDER.index(cap):])
    if priority not in allowed:
        raise ApiError(403, "permission_denied", f"priority: {priority!r} is above this API key's "
                       f"cap of {cap!r} (an operator sets it: `latentd keys create NAME "
                       f"--max-priority high|normal|low`)", "priority", allowed)


def edit_inputs(image: bytes | None, mask: bytes | None, settings):
    """Decode and check an edit's uploads (model/edit_inputs.py): (PIL image, L mask or None),
    or (None, None) for a generation. Raises ApiError 422 naming `image` or `mask`."""
    from latentd.model.edit_inputs import mask_to_l, open_image

    if image is None:
        if mask is not None:
            raise ApiError(422, "missing_field", "image: an image is required with a mask", "image",
                           "a PNG, JPEG or WebP file")
        return None, None
    try:
        img = open_image(image, "image", settings.max_image_pixels)
        m = None if mask is None else mask_to_l(open_image(mask, "mask", settings.max_image_pixels))
    except InvalidRequest as e:
        raise invalid(e) from None
    return img, m


def rate_limited(limiter: RateLimiter, wait: float) -> ApiError:
    return ApiError(429, "rate_limited",
                    f"rate limit exceeded ({limiter.rate:g} images/s, burst {limiter.burst}); "
                    f"retry in {wait:.2f} s", headers={"Retry-After": limiter.retry_after(wait)})


def params_dict(params) -> dict:
    """The resolved request's fields by name (a shallow copy: its values are immutable; what
    dataclasses.asdict's deep copy cost was a tenth of an admission)."""
    return {name: getattr(params, name) for name in _field_names(type(params))}


@functools.cache
def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def admit(state, req: ImagesGenerationRequest, owner: str, endpoint: str,
          image: bytes | None = None, mask: bytes | None = None, watch=None) -> tuple[str, JobSpec]:
    """Validate, rate-limit and enqueue; returns (job id, spec). Raises ApiError.
    watch: spec -> (listener id, preview interval) to register with the job (jobs/events.py).
    `image` / `mask`: an edit's uploads (decoding them is CPU work: call this in a worker thread)."""
    settings = state.settings
    retry = {"Retry-After": str(settings.retry_after_s)}
    try:
        entry, info = state.models.pick(req.model)
    except ApiError as e:
        if e.status == 503:
            e.headers = retry
        raise
    img, m = edit_inputs(image, mask, settings)
    params = to_job_params(req, info, settings, image_size=None if img is None else img.size,
                           mask_size=None if m is None else m.size,
                           lora_check=loras.checker(entry, info, settings))
    check_delivery(req, settings)
    check_moderation(state, owner, params.moderation)
    check_priority(state, owner, params.priority)
    init = None
    if img is not None:
        from latentd.model.edit_inputs import normalised_png

        init = {"image": normalised_png(img, params.width, params.height, "RGB")}
        if m is not None:
            init["mask"] = normalised_png(m, params.width, params.height, "L")
    replay = idempotency.begin(state, endpoint, entry.queue, params, req, init)
    if replay is not None:           # the same Idempotency-Key and request: its first job
        return replay
    # a deadline the queue ahead makes unreachable: refused before anything is counted
    check_deadline(state, entry, params.deadline_s, getattr(params, "priority", None))
    limiter: RateLimiter = state.limiter
    quota = state.keys.quota(owner) if state.keys is not None else {}
    rate = None
    if quota:            # the bucket before the quota's count, as its own call
        wait = limiter.take(owner, params.n)
        if wait:
            raise rate_limited(limiter, wait)
    else:                # the bucket inside the admission's own script: one round trip in all
        rate = limiter.args(params.n)
    try:
        spec = JobSpec(owner=owner, **params_dict(params))
    except ValidationError as e:   # our bounds are tighter than the spec's; kept as a safety net
        err = e.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ())) or "body"
        raise ApiError(422, "invalid_value", f"{field}: {err.get('msg')}", field) from None
    submit_kw = idempotency.submit_kwargs(state)
    taken = None
    if quota:      # counted before the submit (one Lua call); the record's qday refunds it later
        submit_kw["job_id"] = submit_kw.get("job_id") or uuid.uuid4().hex
        taken = state.quotas.take(owner, quota, params.n, submit_kw["job_id"])
        submit_kw["record"] = {"qday": taken.day}
    try:
        job_id = state.jobs.submit(spec, callback_url=getattr(req, "callback_url", None),
                                   watch=watch(spec) if watch else None, init=init, queue=entry.queue,
                                   rate=rate, **submit_kw)
    except RateLimited as e:
        raise rate_limited(limiter, e.wait_s) from None
    except QueueFull as e:
        if taken:
            state.quotas.refund(owner, taken, submit_kw["job_id"])
        raise ApiError(503, "queue_full", f"the queue is full ({e.cap} jobs waiting); retry later",
                       headers=retry) from None
    except NotReplicated as e:
        if not e.canceled:                  # it already ran: a retry with the key replays it
            idempotency.keep()
        raise ApiError(503, "replication_timeout", f"{e}; retry later", headers=retry) from None
    except Exception:
        if taken:                           # nothing admitted (Redis refused the writes)
            state.quotas.refund(owner, taken, submit_kw["job_id"])
        raise
    metrics.ADMITTED.labels(endpoint, entry.name).inc()
    return job_id, spec
