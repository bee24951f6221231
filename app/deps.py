"""Annotated dependency aliases, all in one module. Everything lives on `app.state` (built once by
create_app), so these are cheap `async` lookups that never block the event loop."""
from __future__ import annotations

from typing import Annotated

import redis as redis_lib
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import ANONYMOUS
from app.errors import ApiError
from latentd.settings import Settings
from worker.client import JobClient

bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `latentd keys create NAME`")


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _redis(request: Request) -> redis_lib.Redis:
    return request.app.state.redis


async def _jobs(request: Request) -> JobClient:
    return request.app.state.jobs


def owner_of(request: Request, creds: HTTPAuthorizationCredentials | None) -> str:
    """The key's name, ANONYMOUS with auth off; 401 for a missing or unknown key."""
    keys = request.app.state.keys
    if keys is None:
        return ANONYMOUS
    hdr = {"WWW-Authenticate": "Bearer"}
    if creds is None or not creds.credentials:
        raise ApiError(401, "missing_api_key", "missing API key: send 'Authorization: Bearer <key>'",
                       "Authorization", "Bearer <key>", headers=hdr)
    owner = keys.owner(creds.credentials)
    if owner is None:
        raise ApiError(401, "invalid_api_key", "invalid API key", "Authorization", "Bearer <key>",
                       headers=hdr)
    return owner


def owner_of_request(request: Request) -> str:
    """owner_of, reading the Authorization header directly (for hot-path routes)."""
    if request.app.state.keys is None:
        return ANONYMOUS
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    creds = (HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip())
             if scheme.lower() == "bearer" and token.strip() else None)
    return owner_of(request, creds)


async def _owner(request: Request,
                 creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]) -> str:
    return owner_of(request, creds)


SettingsDep = Annotated[Settings, Depends(_settings)]
RedisDep = Annotated[redis_lib.Redis, Depends(_redis)]
JobsDep = Annotated[JobClient, Depends(_jobs)]
OwnerDep = Annotated[str, Depends(_owner)]
CredsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
