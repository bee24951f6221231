"""Models, liveness, readiness and metrics."""
from __future__ import annotations

import hmac

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from latentd.app import loras, metrics
from latentd.app.deps import OwnerDep, StateDep, TokenDep, token_of
from latentd.app.errors import ApiError
from latentd.app.schemas import ErrorResponse, Health, LoraList, ModelList

router = APIRouter(tags=["system"])


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
def list_models(owner: OwnerDep, st: StateDep):
    """Every model of the deployment, the default first, with what it allows, its workers and
    the LoRA adapters it can use."""
    return {"object": "list", "data": [
        {"id": e.name, "default": e.default, "workers": n, "info": info.to_dict() if info else {},
         "loras": [lo.public() for lo in loras.usable(e, info, st.settings)]}
        for e, info, n in st.models.all()]}


@router.get("/v1/loras", response_model=LoraList, responses={401: {"model": ErrorResponse},
                                                             422: {"model": ErrorResponse}})
def list_loras(owner: OwnerDep, st: StateDep,
               model: Annotated[str | None, Query(max_length=200, description="only this model's")] = None):
    """The LoRA adapter files (LATENTD_LORA_DIR, then each model folder's loras/), read now: what
    each is, which models can use it and why the others cannot, or why a file is unusable."""
    models = [(e, info) for e, info, _ in st.models.all() if model is None or e.name == model]
    if not models:
        known = [e.name for e in st.models.entries]
        raise ApiError(422, "invalid_value", f"model: unknown model {model!r}; known: {', '.join(known)}",
                       "model", known)
    return {"object": "list", "data": loras.catalog(models, st.settings)}


@router.get("/healthz", response_model=Health)
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(st: StateDep):
    """200 when Redis answers and at least one worker has its model loaded (and warmed up: a
    compiling worker reports "warming" until its U-Net is compiled); else 503. `models` counts
    each model's ready workers and `no_workers` names the models nobody serves now (their jobs
    wait in their queues): "degraded" while some are served and some are not."""
    retry = {"Retry-After": str(st.settings.retry_after_s)}
    try:
        st.redis.ping()
        per_model = {m: len(ws) for m, ws in st.models.workers(fresh=True).items()}
    except Exception:
        return JSONResponse({"status": "unavailable", "redis": False, "reason": "redis unreachable"},
                            status_code=503, headers=retry)
    workers = sum(per_model.values())
    missing = [m for m, n in per_model.items() if n == 0]
    body = {"redis": True, "workers": workers, "models": per_model, "no_workers": missing}
    if workers == 0:
        return JSONResponse({**body, "status": "unavailable", "reason": "no worker has a model loaded"},
                            status_code=503, headers=retry)
    if missing:
        return {**body, "status": "degraded",
                "reason": f"no worker serves {', '.join(missing)}: their jobs wait in their queues"}
    return {**body, "status": "ready"}


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
