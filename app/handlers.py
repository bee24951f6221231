"""The FastAPI side of app/errors.py: exception handlers that render every rejection as an error
body (and count it in app/metrics.py), and the request body size limit."""
from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from latentd.app import metrics
from latentd.app.errors import ApiError, error_body, error_from, too_large
from latentd.app.schemas import ImagesGenerationRequest
from latentd.app.state import state_of
from latentd.jobs.errors import StoreError

log = logging.getLogger("latentd.api")


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await api_error_handler(request, error_from(list(exc.errors()), model=ImagesGenerationRequest))


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    metrics.rejected(exc.status, exc.code)
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
    return JSONResponse(error_body(exc.code, exc.message, exc.field, exc.allowed, kind),
                        status_code=exc.status, headers=exc.headers)


async def http_error_handler(request: Request, exc: HTTPException) -> JSONResponse:
    status = exc.status_code
    if status == 413:
        body = error_body("body_too_large", "request body too large", "body",
                          {"max_bytes": state_of(request).settings.max_body_bytes})
    elif status == 400:
        body = error_body("invalid_body", f"request body could not be read: {exc.detail} "
                          "(it must be UTF-8 JSON)", "body", "a UTF-8 JSON object")
    elif status in (404, 405):       # no such route (e.g. a job id that decoded to "../x"): name the path
        body = error_body("not_found" if status == 404 else "method_not_allowed",
                          f"{exc.detail}: {request.method} {request.url.path[:200]!r}", "path", None)
    else:
        body = error_body("http_error", str(exc.detail), None, None)
    if status in (400, 413):
            metrics.rejected(status, body["error"]["code"])
    return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))


async def redis_down_handler(request: Request, exc: Exception) -> JSONResponse:
    """Redis unreachable: a quick 503 with Retry-After, not a 500 (and no traceback in the body)."""
    metrics.rejected(503, "unavailable")
    st = state_of(request)
    # a Redis that does not answer (a timeout, not a refusal) would stall the event loop once per
    # request: the breaker (app/breaker.py) fails the next ones fast until a PING answers again
    if isinstance(exc, redis.TimeoutError) and not st.breaker.tripped:
        st.breaker.trip()
    log.warning("redis unavailable on %s: %s", request.url.path, type(exc).__name__)
    return JSONResponse(error_body("unavailable", "the job store is unreachable; retry later",
                                   kind="server_error"), status_code=503,
                        headers={"Retry-After": str(st.settings.retry_after_s)})


# Redis answering but refusing: out of memory (maxmemory reached with noeviction), a replica that
# was the master until a failover (READONLY), a failed disk (MISCONF), loading, busy scripts.
REFUSALS = ("OOM", "READONLY", "MISCONF", "NOREPLICAS", "MASTERDOWN", "LOADING", "BUSY", "TRYAGAIN")


async def redis_refused_handler(request: Request, exc: Exception) -> JSONResponse:
    """Redis refused a command it would normally run: 503 with Retry-After, never a 500 (the
    admission undid its writes: jobs/client.py submit). Other Redis errors are bugs: 500."""
    if not str(exc).split(" ", 1)[0].upper() in REFUSALS and not isinstance(
            exc, (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                  redis.exceptions.BusyLoadingError)):
        return await unhandled_handler(request, exc)
    metrics.rejected(503, "unavailable")
    log.warning("redis refused a command on %s: %s", request.url.path, str(exc)[:200])
    return JSONResponse(error_body("unavailable", "the job store refuses writes right now; retry later",
                                   kind="server_error"),
                        status_code=503, headers={"Retry-After": str(state_of(request).settings.retry_after_s)})


async def store_down_handler(request: Request, exc: Exception) -> JSONResponse:
    """The image store (S3, a folder) cannot be read: 503 with Retry-After, not a 500."""
    metrics.rejected(503, "unavailable")
    log.warning("image store unavailable on %s: %s", request.url.path, exc)
    return JSONResponse(error_body("storage_unavailable", "the image store is unreachable; retry later",
                                   kind="server_error"), status_code=503,
                        headers={"Retry-After": str(state_of(request).settings.retry_after_s)})


async def unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.scope.get("route", ""))
    return JSONResponse(error_body("internal", "internal error", kind="server_error"),
                        status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(redis.ConnectionError, redis_down_handler)
    app.add_exception_handler(redis.TimeoutError, redis_down_handler)
    app.add_exception_handler(redis.ResponseError, redis_refused_handler)
    app.add_exception_handler(StoreError, store_down_handler)
    app.add_exception_handler(Exception, unhandled_handler)


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
        metrics.rejected(413, "body_too_large")
        e = too_large(limit)
        resp = JSONResponse(error_body(e.code, e.message, e.field, e.allowed), status_code=413,
                            headers=e.headers)
        await resp(scope, None, send)
