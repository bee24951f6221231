"""What the API holds for its lifetime, built once by create_app: one `AppState`.

Routes, handlers and dependencies reach it through `state_of(request)` (or `deps.StateDep`),
never through attributes of `app.state` set here and there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import redis as redis_lib
from fastapi import FastAPI, Request

from latentd.app import signing
from latentd.app.auth import KeyStore
from latentd.app.breaker import BreakerPool
from latentd.app.models import ModelSource
from latentd.app.quota import Quotas
from latentd.app.ratelimit import RateLimiter
from latentd.config.settings import Settings
from latentd.jobs.client import JobClient

SYNC_WAITERS = 256         # threads for the synchronous endpoints' waits (see AppState.waits)


@dataclass
class AppState:
    settings: Settings
    redis: redis_lib.Redis                 # handlers' client: short timeouts, behind `breaker`
    breaker: BreakerPool                   # the pool of `redis`; tripped by a Redis timeout
    aredis: Any                            # redis.asyncio client for the event streams
    jobs: JobClient
    keys: KeyStore | None                  # None: auth off
    secret: bytes                          # signs image URLs (app/signing.py)
    limiter: RateLimiter
    models: ModelSource
    quotas: Quotas                         # per-key quotas' counters (app/quota.py)
    _waits: anyio.CapacityLimiter | None = field(default=None, repr=False)

    def waits(self) -> anyio.CapacityLimiter:
        """Sync waits get their own thread budget: hundreds of clients waiting for their images
        must not take the default pool's threads that /readyz, /v1/models and /metrics run on
        (600 waiters kept /v1/models waiting 35 s). Made on first use, inside the event loop."""
        if self._waits is None:
            self._waits = anyio.CapacityLimiter(SYNC_WAITERS)
        return self._waits


def make_redis(settings: Settings) -> redis_lib.Redis:
    """Short timeouts: handlers call Redis inline on the event loop, so a sick Redis must turn
    into a quick 503 rather than a stalled process (and BreakerPool stops the next requests from
    trying until Redis answers again)."""
    from latentd.config.redis_url import sync_client

    # a sentinel URL (config/redis_url.py) gets the same breaker on a Sentinel-managed pool: during
    # a failover connections fail fast (503 + Retry-After) until the sentinels name the new master
    return sync_client(settings.redis_url, pool_class=BreakerPool, socket_connect_timeout=1,
                       socket_timeout=3, health_check_interval=30, max_connections=1000)


def make_async_redis(settings: Settings):
    """For the event streams (app/events.py): a blocking XREAD waits here without holding the
    event loop or a thread; its socket timeout outlasts one XREAD block."""
    from latentd.config.redis_url import async_client

    return async_client(settings.redis_url, socket_connect_timeout=1, socket_timeout=10,
                        health_check_interval=30)


def build_state(settings: Settings, keys: KeyStore | None) -> AppState:
    redis = make_redis(settings)
    jobs = JobClient(redis, settings)
    aredis = make_async_redis(settings)
    return AppState(settings=settings, redis=redis, breaker=redis.connection_pool,
                    aredis=aredis, jobs=jobs, keys=keys,
                    secret=signing.secret_bytes(settings),
                    limiter=RateLimiter(redis, settings.rate_limit_per_s, settings.rate_limit_burst),
                    models=ModelSource(jobs), quotas=Quotas(redis, aredis))


def attach(app: FastAPI, state: AppState) -> None:
    app.state.latentd = state


def app_state(app: FastAPI) -> AppState:
    return app.state.latentd


def state_of(request: Request) -> AppState:
    """The API's state, from any route, handler or dependency."""
    return request.app.state.latentd

