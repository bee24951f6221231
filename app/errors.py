"""Error bodies and handlers: every rejection is `{"error": {code, message, field, allowed}}`
(plus OpenAI's `type`/`param`, so the `openai` client reports it), never a bare 500.

Pydantic's errors become 422 naming the first bad field and its allowed range; unreadable bodies
(invalid JSON or UTF-8) name `body`; an oversized body is 413.
"""
from __future__ import annotations

import logging
import math

import redis

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("latentd.api")


class ApiError(Exception):
    """Raised by routes and deps; rendered by `api_error_handler`."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 allowed: object = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.allowed, self.headers = field, allowed, headers


def error_body(code: str, message: str, field: str | None = None, allowed: object = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"code": code, "message": message, "field": field, "allowed": allowed,
                      "type": kind, "param": field}}


def _field_of(loc: tuple) -> str:
    """("body", "steps") -> "steps"; ("path", "k") -> "k"; ("body",) -> "body"."""
    parts = [str(p) for p in (loc[1:] if loc[:1] in (("body",), ("query",), ("path",), ("header",))
                              else loc)]
    return ".".join(parts) or "body"


def _allowed_of(err: dict) -> object:
    ctx = err.get("ctx") or {}
    lo = next((ctx[k] for k in ("ge", "gt", "min_length") if k in ctx), None)
    hi = next((ctx[k] for k in ("le", "lt", "max_length") if k in ctx), None)
    if "expected" in ctx:
        return str(ctx["expected"])
    if lo is not None or hi is not None:
        return {"min": lo, "max": hi}
    t = err.get("type", "")
    for word, what in (("int", "an integer"), ("float", "a finite number"), ("bool", "true or false"),
                       ("string", "a string"), ("finite", "a finite number")):
        if word in t:
            return what
    return None


def _json_safe(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):          # {"min": 1, "max": 16} stays a JSON object, not its repr
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


def error_from(errs: list, prefix: tuple = ()) -> ApiError:
    """The ApiError for the first of pydantic's errors (`prefix` is prepended to each loc, e.g.
    ("body",) for errors of model_validate_json, whose locs are relative to the body)."""
    err = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": "invalid"}
    loc = prefix + tuple(err.get("loc") or ())
    kind = err.get("type", "")
    if kind == "json_invalid" or (kind == "value_error" and loc in ((), ("body",))):
        detail = (err.get("ctx") or {}).get("error", "") or err.get("msg", "")
        return ApiError(400, "invalid_json", f"request body is not valid UTF-8 JSON: {detail}",
                        "body", "a UTF-8 JSON object")
    field = _field_of(loc or ("body",))
    if kind == "extra_forbidden":
        return ApiError(422, "unknown_field", f"{field}: unknown field", field, None)
    if kind == "missing":
        return ApiError(422, "missing_field", f"{field}: field required", field, None)
    if field == "body":
        return ApiError(422, "invalid_body", "request body must be a JSON object", "body", "a JSON object")
    allowed = _allowed_of(err)
    if isinstance(allowed, dict):    # both ends of the range, not only the one that failed
        allowed = {**_field_bounds(field), **{k: v for k, v in allowed.items() if v is not None}}
    return ApiError(422, "invalid_value", f"{field}: {err.get('msg', 'invalid value')}", field,
                    _json_safe(allowed))


def _field_bounds(field: str) -> dict:
    """The declared bounds of a request field ({"min": 1, "max": 16} for n)."""
    try:
        from app.schemas import ImagesGenerationRequest

        info = ImagesGenerationRequest.model_fields.get(field)
    except Exception:  # noqa: BLE001 - only a nicer message; never fail the error path
        return {}
    out: dict = {}
    for m in getattr(info, "metadata", None) or ():
        for attr, key in (("ge", "min"), ("gt", "min"), ("min_length", "min"),
                          ("le", "max"), ("lt", "max"), ("max_length", "max")):
            if getattr(m, attr, None) is not None:
                out.setdefault(key, getattr(m, attr))
    return out


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await api_error_handler(request, error_from(list(exc.errors())))


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    from app import metrics

    metrics.rejected(exc.status, exc.code)
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
    return JSONResponse(error_body(exc.code, exc.message, exc.field, exc.allowed, kind),
                        status_code=exc.status, headers=exc.headers)


async def http_error_handler(request: Request, exc: HTTPException) -> JSONResponse:
    status = exc.status_code
    if status == 413:
        body = error_body("body_too_large", "request body too large", "body",
                          {"max_bytes": request.app.state.settings.max_body_bytes})
    elif status == 400:
        body = error_body("invalid_body", f"request body could not be read: {exc.detail} "
                          "(it must be UTF-8 JSON)", "body", "a UTF-8 JSON object")
    elif status in (404, 405):       # no such route (e.g. a job id that decoded to "../x"): name the path
        body = error_body("not_found" if status == 404 else "method_not_allowed",
                          f"{exc.detail}: {request.method} {request.url.path[:200]!r}", "path", None)
    else:
        body = error_body("http_error", str(exc.detail), None, None)
    if status in (400, 413):
        from app import metrics

        metrics.rejected(status, body["error"]["code"])
    return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))


async def redis_down_handler(request: Request, exc: Exception) -> JSONResponse:
    """Redis unreachable: a quick 503 with Retry-After, not a 500 (and no traceback in the body)."""
    from app import metrics

    metrics.rejected(503, "unavailable")
    pool = request.app.state.redis.connection_pool
    # a Redis that does not answer (a timeout, not a refusal) would stall the event loop once per
    # request: app.main.BreakerPool fails the next ones fast until a PING answers again
    if isinstance(exc, redis.TimeoutError) and not getattr(pool, "tripped", True):
        pool.trip()
    log.warning("redis unavailable on %s: %s", request.url.path, type(exc).__name__)
    return JSONResponse(error_body("unavailable", "the job store is unreachable; retry later",
                                   kind="server_error"), status_code=503,
                        headers={"Retry-After": str(request.app.state.settings.retry_after_s)})


async def store_down_handler(request: Request, exc: Exception) -> JSONResponse:
    """The image store (S3, a folder) cannot be read: 503 with Retry-After, not a 500."""
    from app import metrics

    metrics.rejected(503, "unavailable")
    log.warning("image store unavailable on %s: %s", request.url.path, exc)
    return JSONResponse(error_body("storage_unavailable", "the image store is unreachable; retry later",
                                   kind="server_error"), status_code=503,
                        headers={"Retry-After": str(request.app.state.settings.retry_after_s)})


async def unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.scope.get("route", ""))
    return JSONResponse(error_body("internal", "internal error", kind="server_error"),
                        status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    import redis

    app.add_exception_handler(redis.ConnectionError, redis_down_handler)
    app.add_exception_handler(redis.TimeoutError, redis_down_handler)
    from worker.store import StoreError

    app.add_exception_handler(StoreError, store_down_handler)
    app.add_exception_handler(Exception, unhandled_handler)


def too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body too large (max {limit} bytes)", "body",
                    {"max_bytes": limit}, headers={"Connection": "close"})


class BodyLimitMiddleware:
    """413 (JSON, naming `body`) for request bodies over `limit` bytes (`large_limit` on the
    routes in `large_paths`, whose bodies may carry images): by Content-Length before reading,
    or while reading a chunked body. The accepted body is buffered and replayed to the app."""

    def __init__(self, app, limit: int, large_limit: int | None = None, large_paths: tuple = ()):
        self.app, self.limit = app, limit
        self.large_limit, self.large_paths = large_limit or limit, frozenset(large_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.large_limit if scope["path"].rstrip("/") in self.large_paths else self.limit
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._too_large(scope, send, limit)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > limit:
                return await self._too_large(scope, send, limit)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, send, limit: int):
        from app import metrics

        metrics.rejected(413, "body_too_large")
        e = too_large(limit)
        resp = JSONResponse(error_body(e.code, e.message, e.field, e.allowed), status_code=413,
                            headers=e.headers)
        await resp(scope, None, send)
