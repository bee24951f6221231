"""Models, liveness, readiness and metrics."""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from latentd.app import metrics
from latentd.app.deps import OwnerDep, StateDep, TokenDep, token_of
from latentd.app.errors import ApiError
from latentd.app.schemas import ErrorResponse, Health, ModelList

router = APIRouter(tags=["system"])


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
def list_models(owner: OwnerDep, st: StateDep):
    models = st.models.all()
    return {"object": "list", "data": [{"id": m.name, "info": m.to_dict()} for m in models]}


@router.get("/healthz", response_model=Health)
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(st: StateDep):
    """200 when Redis answers and at least one worker has its model loaded (and warmed up: a
    compiling worker reports "warming" until its U-Net is compiled); else 503."""
    retry = {"Retry-After": str(st.settings.retry_after_s)}
    try:
        st.redis.ping()
        workers = len(st.jobs.ready_workers())
    except Exception:
        return JSONResponse({"status": "unavailable", "redis": False, "reason": "redis unreachable"},
                            status_code=503, headers=retry)
    if workers == 0:
        return JSONResponse({"status": "unavailable", "redis": True, "workers": 0,
                             "reason": "no worker has a model loaded"}, status_code=503, headers=retry)
    return {"status": "ready", "redis": True, "workers": workers}


def metrics_route(request: Request, st: StateDep, _token: TokenDep):
    token = st.settings.metrics_token
    sent = token_of(request)
    if token and (sent is None or not hmac.compare_digest(sent.encode(), token.encode())):
        raise ApiError(401, "invalid_metrics_token", "/metrics needs 'Authorization: Bearer <token>'",
                       "Authorization", headers={"WWW-Authenticate": "Bearer"})
    return Response(metrics.render(st.jobs), media_type="text/plain; version=0.0.4; charset=utf-8")


def add_metrics_route(app) -> None:
    app.add_api_route("/metrics", metrics_route, methods=["GET"], tags=["system"],
                      response_class=Response, responses={401: {"model": ErrorResponse}})
