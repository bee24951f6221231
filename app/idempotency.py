"""The Idempotency-Key header of POST /v1/images/generations, /v1/images/edits and /v1/jobs.

A retried request with the same key (per API key) and the same request never creates a second
job: the first admission's job is answered again (/v1/jobs: the same id, 200 instead of 202, and
`Idempotent-Replayed: true`; the synchronous endpoints: that job's result, waiting for it if it
still runs). The same key with a different request is a 422 `idempotency_key_reused`; a key
whose first request is being admitted at this moment is a 409 with Retry-After.

"The same request" is the RESOLVED request (jobs/request_resolve.py: defaults filled in, sizes
and aliases normalised), so equivalent JSON spellings match, plus the delivery options
(response_format, stream, callback_url, ...) and an edit's normalised uploads; the seed counts
only when the client sent one (a drawn seed never makes two retries differ).

How it plugs in: a route runs admission inside `scope(request, owner)`, which reads and checks
the header (400 naming it) and releases the reservation if admission fails; admission
(app/admission.py) calls `begin()` once the request is resolved and before anything is spent
(rate limit, queue), and passes `submit_kwargs()` to JobClient.submit, which marks the key
admitted in the admission's own round trip. The Redis side is jobs/idempotency.py.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import uuid
from dataclasses import dataclass

from fastapi import Request

from latentd.app.errors import ApiError
from latentd.jobs import keys
from latentd.jobs.idempotency import IdempotencyStore
from latentd.jobs.spec import JobSpec

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_LEN = 255
DELIVERY = ("response_format", "stream", "partial_images", "callback_url")

# the OpenAPI parameter the three POST routes document (openapi_extra)
PARAMETER = {"name": HEADER, "in": "header", "required": False,
             "description": "Retry safely: the same key with the same request returns the first "
                            "request's job (or result) instead of creating another one, for "
                            "LATENTD_IDEMPOTENCY_TTL_S (24 h). 1-255 printable ASCII characters; "
                            "scoped to the API key. The same key with a different request: 422.",
             "schema": {"type": "string", "minLength": 1, "maxLength": MAX_LEN,
                        "pattern": "^[\\x21-\\x7e]([\\x20-\\x7e]*[\\x21-\\x7e])?$"}}
REPLAY_HEADER_DOC = {REPLAYED: {"description": "`true` when this answer replays an earlier "
                                               "request with the same Idempotency-Key",
                                "schema": {"type": "string"}}}


@dataclass
class Idem:
    owner: str
    key: str
    job_id: str | None = None        # reserved by our claim (we admit it)
    replayed: bool = False           # the answer is an earlier request's job


_current: contextvars.ContextVar[Idem | None] = contextvars.ContextVar("latentd_idem", default=None)


def header_value(request: Request) -> str | None:
    """The header, checked: 400 naming it for an empty, over-long or non-printable value."""
    raw = request.headers.getlist(HEADER)
    if not raw:
        return None
    allowed = f"1 to {MAX_LEN} printable ASCII characters, sent once"
    if len(raw) > 1:
        raise ApiError(400, "invalid_header", f"{HEADER}: sent more than once", HEADER, allowed)
    value = raw[0]
    if not value or len(value) > MAX_LEN or not value.isprintable() or not value.isascii() \
            or value != value.strip():
        why = ("empty" if not value else f"longer than {MAX_LEN} characters" if len(value) > MAX_LEN
               else "contains control, non-ASCII or surrounding space characters")
        raise ApiError(400, "invalid_header", f"{HEADER}: {why}", HEADER, allowed)
    return value


@contextlib.contextmanager
def scope(request: Request, owner: str):
    """Run an admission under the request's Idempotency-Key (None without the header). A
    reservation this request made is released if the admission raises."""
    value = header_value(request)
    if value is None:
        yield None
        return
    idem = Idem(owner, value)
    token = _current.set(idem)
    try:
        yield idem
    except BaseException:
        if idem.job_id is not None:
            from latentd.app.state import state_of

            with contextlib.suppress(Exception):
                IdempotencyStore(state_of(request).redis).release(owner, value, idem.job_id)
        raise
    finally:
        _current.reset(token)


def fingerprint(endpoint: str, queue: str, params, req, init: dict | None) -> str:
    d = dict(params.to_dict())
    d["seed"] = getattr(req, "seed", None)          # a drawn seed is not part of the request
    doc = {"endpoint": endpoint, "queue": queue, "params": d,
           "delivery": {f: getattr(req, f, None) for f in DELIVERY},
           "init": {k: hashlib.sha256(v).hexdigest() for k, v in sorted((init or {}).items())}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def begin(state, endpoint: str, queue: str, params, req, init: dict | None):
    """Called by admission once the request is resolved. None: go on and admit (under a fresh
    reservation when the header was sent). Else (job id, spec) of the first request's job."""
    idem = _current.get()
    if idem is None:
        return None
    fp = fingerprint(endpoint, queue, params, req, init)
    job_id = uuid.uuid4().hex
    held = IdempotencyStore(state.redis).claim(idem.owner, idem.key, job_id, fp)
    if held is None:
        idem.job_id = job_id
        return None
    held_id, held_fp, held_state = held
    if held_fp != fp:
        raise ApiError(422, "idempotency_key_reused",
                       f"{HEADER}: this key was used with a different request; use a new key "
                       "for a new request", HEADER, "the request first sent with this key")
    spec_json = state.redis.hget(keys.job(held_id), "spec") if held_state == "admitted" else None
    if spec_json is None:           # its first request is being admitted right now
        raise ApiError(409, "idempotency_key_in_use",
                       f"{HEADER}: a request with this key is being admitted; retry shortly",
                       HEADER, headers={"Retry-After": "1"})
    idem.replayed = True
    return held_id, JobSpec.from_json(spec_json)


def submit_kwargs(state) -> dict:
    """What JobClient.submit needs to admit under the reservation ({} without the header)."""
    idem = _current.get()
    if idem is None or idem.job_id is None:
        return {}
    ttl = min(state.settings.idempotency_ttl_s, state.settings.result_ttl_s)
    return {"job_id": idem.job_id, "idempotency": (idem.owner, idem.key, ttl)}


def keep() -> None:
    """The refused admission's job exists and stays (it ended within the replication wait): keep
    the key naming it, so a retry gets that job rather than a second one."""
    idem = _current.get()
    if idem is not None:
        idem.job_id = None


def replay_headers(idem: Idem | None) -> dict[str, str]:
    return {REPLAYED: "true"} if idem is not None and idem.replayed else {}
