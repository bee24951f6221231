"""Builds the API: `create_app(settings)`. Thin: its state in one AppState (app/state.py), routes
in app/routes/, shared answers in app/responses.py, the Redis circuit breaker in app/breaker.py.

Refuses insecure configurations outside dev (LATENTD_ENV != dev): auth on with no keys, or no
(or a weak) URL-signing secret. In dev, auth is off unless keys are configured.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from latentd.app import auth, fastpath, handlers, signing
from latentd.app.metrics import MetricsMiddleware
from latentd.app.quota_headers import QuotaHeadersMiddleware
from latentd.app.routes import edits, images, jobs, playground, sdapi, system, usage
from latentd.app.state import app_state, attach, build_state
from latentd.app.uploads import UPLOAD_PATHS
from latentd.config.settings import Settings, get_settings
from latentd.jobs import webhooks

log = logging.getLogger("latentd.api")


class InsecureConfig(RuntimeError):
    pass


def config_problems(settings: Settings) -> list[str]:
    """What stops the API from starting (empty outside dev means OK; dev never refuses)."""
    if settings.env == "dev":
        return []
    out = []
    if auth.auth_enabled(settings) and not auth.load_keys(settings):
        out.append("no API keys configured: run `latentd keys create NAME` (keys file "
                   f"{auth.keys_path(settings)}) or set LATENTD_API_KEYS, or switch auth off "
                   "explicitly with LATENTD_AUTH=off / `latentd serve --insecure-no-auth`")
    problem = signing.secret_problem(settings)
    if problem:
        out.append(problem + "; e.g. LATENTD_SIGNING_SECRET=$(openssl rand -hex 32)")
    problem = webhooks.secret_problem(settings)
    if problem:
        out.append(problem + "; e.g. LATENTD_WEBHOOK_SECRET=$(openssl rand -hex 32)")
    return out


def key_store(settings: Settings) -> auth.KeyStore | None:
    """None = auth off (explicitly, or dev without keys)."""
    if not auth.auth_enabled(settings):
        return None
    keys = auth.load_keys(settings)
    return auth.KeyStore(keys, auth.load_permissions(settings),
                         auth.load_max_priority(settings),
                         quotas=auth.load_quotas(settings)) if keys or settings.env != "dev" else None


@asynccontextmanager
async def lifespan(app: FastAPI):
    import anyio.to_thread

    # sync routes wait on Redis (the sync endpoint for a whole job): allow many in flight
    anyio.to_thread.current_default_thread_limiter().total_tokens = 256
    yield
    st = app_state(app)
    st.redis.close()
    await st.aredis.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    problems = config_problems(settings)
    if problems:
        raise InsecureConfig("; ".join(problems))
    app = FastAPI(title="latentd", version="0.1.0", lifespan=lifespan,
                  description="Self-hosted text-to-image: OpenAI-compatible images API + async jobs")
    st = build_state(settings, key_store(settings))
    attach(app, st)
    handlers.install(app)
    for r in (images.router, edits.router, jobs.router, system.router, playground.router, sdapi.router,
              usage.router):
        app.include_router(r)
    if not settings.metrics_port:
        system.add_metrics_route(app)
    fastpath.install(app, jobs.router)      # the innermost middleware: the hot path skips the router
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(handlers.BodyLimitMiddleware, limit=settings.max_body_bytes,
                       large_limit=settings.max_edit_body_bytes,
                       large_paths=UPLOAD_PATHS + sdapi.UPLOAD_PATHS)
    app.add_middleware(QuotaHeadersMiddleware)     # inside the metrics one: every answer, 429s too
    app.add_middleware(MetricsMiddleware)
    log.info("latentd API: auth %s, %d key(s), models %s (default %s)",
             "on" if st.keys is not None else "OFF", len(st.keys or ()),
             ", ".join(e.name for e in st.models.entries), st.models.default.name)
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory latentd.app.main:app_from_env` (settings from the environment)."""
    return create_app(get_settings())
