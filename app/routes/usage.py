"""GET /v1/usage: the calling key's usage by UTC day and model, from the per-day hashes that
jobs/state.py end_job writes as each job ends (jobs/keys.py usage): so it is the sum of the
`usage` fields of the key's jobs that ended in the range."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Annotated

from fastapi import APIRouter, Query

from latentd.app.deps import OwnerDep, StateDep
from latentd.app.errors import ApiError
from latentd.app.schemas import ErrorResponse, UsageReport
from latentd.jobs import keys

router = APIRouter(tags=["usage"])
DEFAULT_DAYS = 7
MAX_DAYS = keys.USAGE_TTL_S // 86400        # older days are gone anyway
METRICS = {"images": int, "compute_s": float, "steps": int, "jobs": int}
DATE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"


def _day(name: str, text: str | None, default: date) -> date:
    if text is None:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ApiError(422, "invalid_value", f"{name}: not a date, got {text!r}", name,
                       "a UTC date YYYY-MM-DD") from None


def _zero() -> dict:
    return {"images": 0, "compute_seconds": 0.0, "steps": 0, "jobs": 0}


def _add(into: dict, metric: str, value) -> None:
    into["compute_seconds" if metric == "compute_s" else metric] += value


@router.get("/v1/usage", response_model=UsageReport,
            responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
def get_usage(owner: OwnerDep, st: StateDep,
              start: Annotated[str | None, Query(pattern=DATE, description=(
                  f"first UTC day YYYY-MM-DD, inclusive (default: {DEFAULT_DAYS - 1} days before end)"))] = None,
              end: Annotated[str | None, Query(pattern=DATE, description=(
                  "last UTC day YYYY-MM-DD, inclusive (default: today)"))] = None):
    """Images, compute-seconds, denoising steps and jobs of the calling key's jobs that ended in
    [start, end] (UTC days), in total, by model and by day; at most MAX_DAYS days (kept that long)."""
    today = datetime.now(timezone.utc).date()
    last = _day("end", end, today)
    first = _day("start", start, last - timedelta(days=DEFAULT_DAYS - 1))
    if first > last:
        raise ApiError(422, "invalid_value", f"start: {first} is after end {last}", "start",
                       f"a date on or before {last}")
    span = (last - first).days + 1
    if span > MAX_DAYS:
        raise ApiError(422, "invalid_value", f"start: the range covers {span} days; at most {MAX_DAYS}",
                       "start", {"max_days": MAX_DAYS})
    days = [first + timedelta(days=i) for i in range(span)]
    pipe = st.redis.pipeline(transaction=False)
    for d in days:
        pipe.hgetall(keys.usage(owner, d.isoformat()))
    model_of = {e.queue: e.name for e in st.jobs.deployed}
    total, by_model, out = _zero(), {}, []
    for d, raw in zip(days, pipe.execute()):
        day_total, day_models = _zero(), {}
        for field, value in raw.items():
            queue, _, metric = field.decode().rpartition("|")
            if metric not in METRICS:
                continue
            v = METRICS[metric](float(value))
            model = model_of.get(queue, queue)
            for acc in (total, day_total, by_model.setdefault(model, _zero()),
                        day_models.setdefault(model, _zero())):
                _add(acc, metric, v)
        out.append({"date": d.isoformat(), "total": day_total, "by_model": day_models})
    for acc in [total, *by_model.values()] + [x for o in out for x in (o["total"], *o["by_model"].values())]:
        acc["compute_seconds"] = round(acc["compute_seconds"], 6)
    quota = st.keys.quota(owner) if st.keys is not None else {}
    return {"object": "usage", "start": first.isoformat(), "end": last.isoformat(), "total": total,
            "by_model": by_model, "days": out, "quota": quota}
