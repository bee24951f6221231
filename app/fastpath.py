"""The admission route without the framework's per-request machinery.

POST /v1/jobs is the API's hot path. FastAPI would match it against the routes, build its
exception and dependency scaffolding and then call `routes/jobs.py submit_job`, which reads the
request itself and needs none of that; here the same function is called directly, with the same
exception handlers (app/handlers.py) and the same `route` in the scope (so the metrics label the
request by its template). Everything around it stays as it is: this middleware is the innermost
of the app's own (metrics, quota headers and the body limit still wrap it) and anything else
(another path or method, a root_path) goes on to FastAPI's router.
"""
from __future__ import annotations

import inspect

from starlette._exception_handler import _lookup_exception_handler
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request

PATH = "/v1/jobs"


class JobsFastPath:
    def __init__(self, app, endpoint, route):
        self.app, self.endpoint, self.route = app, endpoint, route
        self._handlers = None

    def handlers(self, app) -> tuple[dict, dict]:
        """The exception handlers FastAPI's ExceptionMiddleware would use (the catch-all one stays
        with the outermost ServerErrorMiddleware, as there)."""
        if self._handlers is None:
            exc, status = {}, {}
            for key, fn in app.exception_handlers.items():
                if key in (500, Exception):
                    continue
                (status if isinstance(key, int) else exc)[key] = fn
            self._handlers = (exc, status)
        return self._handlers

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST"
                or scope.get("root_path")):
            return await self.app(scope, receive, send)
        scope["route"] = self.route
        scope["endpoint"] = self.endpoint
        request = Request(scope, receive, send)
        started = False

        async def sender(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            response = await self.endpoint(request)
        except Exception as exc:
            handlers, status_handlers = self.handlers(scope["app"])
            handler = status_handlers.get(exc.status_code) if isinstance(exc, HTTPException) else None
            handler = handler or _lookup_exception_handler(handlers, exc)
            if handler is None or started:
                raise
            response = (await handler(request, exc) if inspect.iscoroutinefunction(handler)
                        else await run_in_threadpool(handler, request, exc))
            exc.__traceback__ = None
        await response(scope, receive, sender)


def install(app, router) -> None:
    """Add the fast path for POST /v1/jobs, the route of `router` (routes/jobs.py) that serves it;
    call it before the other middleware is added, so that it is the innermost."""
    for route in router.routes:
        if getattr(route, "path", None) == PATH and "POST" in getattr(route, "methods", ()):
            app.add_middleware(JobsFastPath, endpoint=route.endpoint, route=route)
            return
    raise RuntimeError(f"no POST {PATH} route to serve fast")
