"""Builds the API: `create_app(settings)`. Thin: state on app.state, routes in app/routes/.

Refuses insecure configurations outside dev (LATENTD_ENV != dev): auth on with no keys, or no
(or a weak) URL-signing secret. In dev, auth is off unless keys are configured.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager

import redis as redis_lib
from fastapi import FastAPI

from latentd.app import auth, handlers, signing
from latentd.app.admission import ModelSource
from latentd.app.metrics import MetricsMiddleware
from latentd.app.ratelimit import RateLimiter
from latentd.app.routes import edits, images, jobs, playground, system
from latentd.config.settings import Settings, get_settings
from latentd.jobs import webhooks
from latentd.jobs.client import JobClient

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
    return auth.KeyStore(keys) if keys or settings.env != "dev" else None


class BreakerPool(redis_lib.ConnectionPool):
    """A circuit breaker in front of the pool. Handlers call Redis inline on the event loop, so
    with a Redis that hangs (frozen, partitioned) every request would block the whole loop for a
    socket timeout in turn: 20 waiting status reads = /healthz stalled for 60 s. After a Redis
    error (handlers.redis_down_handler calls trip()) connections are refused at once, so requests
    get their 503 without touching Redis, and a background PING closes the breaker again."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tripped = False
        self._probing = threading.Lock()

    def trip(self) -> None:
        self.tripped = True
        if self._probing.acquire(blocking=False):
            threading.Thread(target=self._probe, name="redis-breaker", daemon=True).start()

    def _probe(self) -> None:
        try:
            while self.tripped:
                conn = self.connection_class(**self.connection_kwargs)
                try:
                    conn.send_command("PING")
                    if conn.read_response() in (b"PONG", "PONG"):
                        self.tripped = False
                except (redis_lib.RedisError, OSError):
                    time.sleep(0.25)
                finally:
                    conn.disconnect()
        except Exception:  # noqa: BLE001 - never leave the breaker stuck open
            log.exception("redis breaker probe failed; closing the breaker")
            self.tripped = False
        finally:
            self._probing.release()

    def get_connection(self, *args, **kwargs):
        if self.tripped:
            raise redis_lib.ConnectionError("Redis marked unavailable (circuit breaker open)")
        return super().get_connection(*args, **kwargs)


def make_redis(settings: Settings) -> redis_lib.Redis:
    """Short timeouts: handlers call Redis inline on the event loop, so a sick Redis must turn
    into a quick 503 rather than a stalled process (and BreakerPool stops the next requests from
    trying until Redis answers again)."""
    pool = BreakerPool.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=3,
                                health_check_interval=30, max_connections=1000)
    return redis_lib.Redis(connection_pool=pool)


def make_async_redis(settings: Settings):
    """For the event streams (app/events.py): a blocking XREAD waits here without holding the
    event loop or a thread; its socket timeout outlasts one XREAD block."""
    import redis.asyncio

    return redis.asyncio.Redis.from_url(settings.redis_url, socket_connect_timeout=1,
                                        socket_timeout=10, health_check_interval=30)


@asynccontextmanager
async def lifespan(app: FastAPI):
    import anyio.to_thread

    # sync routes wait on Redis (the sync endpoint for a whole job): allow many in flight
    anyio.to_thread.current_default_thread_limiter().total_tokens = 256
    yield
    app.state.redis.close()
    await app.state.aredis.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    problems = config_problems(settings)
    if problems:
        raise InsecureConfig("; ".join(problems))
    app = FastAPI(title="latentd", version="0.1.0", lifespan=lifespan,
                  description="Self-hosted text-to-image: OpenAI-compatible images API + async jobs")
    st = app.state
    st.settings = settings
    st.redis = make_redis(settings)
    st.aredis = make_async_redis(settings)
    st.jobs = JobClient(st.redis, settings)
    st.keys = key_store(settings)
    st.secret = signing.secret_bytes(settings)
    st.limiter = RateLimiter(st.redis, settings.rate_limit_per_s, settings.rate_limit_burst)
    st.models = ModelSource(settings, st.jobs)
    handlers.install(app)
    for r in (images.router, edits.router, jobs.router, system.router, playground.router):
        app.include_router(r)
    if not settings.metrics_port:
        system.add_metrics_route(app)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(handlers.BodyLimitMiddleware, limit=settings.max_body_bytes,
                       large_limit=settings.max_edit_body_bytes, large_paths=edits.UPLOAD_PATHS)
    app.add_middleware(MetricsMiddleware)
    log.info("latentd API: auth %s, %d key(s), model %s", "on" if st.keys is not None else "OFF",
             len(st.keys or ()), st.models.local.name if st.models.local else "(from workers)")
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory latentd.app.main:app_from_env` (settings from the environment)."""
    return create_app(get_settings())
