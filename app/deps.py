"""Dependencies of the routes, all in one module. Everything lives in the app's `AppState` (built
once by create_app, app/state.py), so these are cheap lookups that never block the event loop.

The owner of a request (the API key's name) is resolved in one place, `owner_of`, from the
Authorization header (`token_of`, through `auth.bearer`); `OwnerDep` is the same function as a dependency, with the
HTTPBearer scheme declared so that the OpenAPI document shows the key."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from latentd.app.auth import ANONYMOUS, basic_password, bearer
from latentd.app.errors import ApiError
from latentd.app.state import AppState, state_of
from latentd.jobs.client import JobClient

bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `latentd keys create NAME`")


def token_of(request: Request) -> str | None:
    """The API key the request carries (Bearer, or the password of HTTP Basic on every route), None without one."""
    header = request.headers.get("authorization")
    return bearer(header) or basic_password(header)


def owner_of(request: Request) -> str:
    """The key's name, ANONYMOUS with auth off; 401 for a missing or unknown key."""
    keys = state_of(request).keys
    if keys is None:
        return ANONYMOUS
    hdr = {"WWW-Authenticate": "Bearer"}
    token = token_of(request)
    if token is None:
        raise ApiError(401, "missing_api_key", "missing API key: send 'Authorization: Bearer <key>'",
                       "Authorization", "Bearer <key>", headers=hdr)
    owner = keys.owner(token)
    if owner is None:
        raise ApiError(401, "invalid_api_key", "invalid API key", "Authorization", "Bearer <key>",
                       headers=hdr)
    return owner


async def _owner(request: Request, _declared=Depends(bearer_scheme)) -> str:
    return owner_of(request)


async def _state(request: Request) -> AppState:
    return state_of(request)


async def _jobs(request: Request) -> JobClient:
    return state_of(request).jobs


StateDep = Annotated[AppState, Depends(_state)]
JobsDep = Annotated[JobClient, Depends(_jobs)]
OwnerDep = Annotated[str, Depends(_owner)]
TokenDep = Annotated[object, Depends(bearer_scheme)]   # declares the header where a route reads it itself
