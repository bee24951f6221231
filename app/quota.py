"""Per-key quotas and deadline admission.

Quotas (keys file `"quota": {"images": 1000, "compute_s": 3600, "concurrent": 4}`, or
`latentd keys create NAME --quota images=1000,compute_s=3600,concurrent=4`; each optional):

  images      images admitted per UTC day: counted at admission (n), refunded when the job ends
              without them (failed or canceled: n minus the images it recorded), so a key pays
              for what it got, and a refused admission (queue full) is refunded at once
  compute_s   compute-seconds per UTC day: charged when a job ends (jobs/state.py end_job, to the
              day it ended); a request is refused once the day's charge has reached the limit
              (a job cannot know its cost in advance; the last one admitted may go over)
  concurrent  jobs queued or running at once

Counters live in Redis (jobs/keys.py quota, active): they survive an API restart and are shared
by every API replica; the take is one Lua script. Over a quota: 429 `quota_exceeded` naming the
quota in `param`, Retry-After (the seconds until the next UTC midnight for a daily quota, a few
seconds for concurrency). Every response to a key with a quota carries, per quota it has,
`X-RateLimit-Limit-<Q>`, `X-RateLimit-Remaining-<Q>` and (daily ones) `X-RateLimit-Reset-<Q>`
(seconds until the counter resets), <Q> one of Images, Compute, Concurrent.

Deadlines (request `deadline_s`): `estimated_start_s` is the admission's estimate of when a new
job of a model would start; see its docstring.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from latentd.app.errors import ApiError
from latentd.jobs import keys

QUOTAS = {"images": "images admitted per UTC day",
          "compute_s": "compute-seconds charged per UTC day",
          "concurrent": "jobs queued or running at once"}
HEADER = {"images": "Images", "compute_s": "Compute", "concurrent": "Concurrent"}
MAX_QUOTA = 10 ** 9
CONCURRENT_RETRY_S = 2          # a running job ends soon enough to be worth a retry then
# an active id without a job record is an admission that never got written (the API died
# between the take and the submit): dropped once it is this old, so it cannot hold a slot forever
ORPHAN_S = 60


def check_quota(raw, where: str = "quota") -> dict[str, int]:
    """A quota mapping {images?, compute_s?, concurrent?} of positive integers, or ValueError
    naming the field and what it allows."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object like {{\"images\": 1000, \"compute_s\": 3600, "
                         f"\"concurrent\": 4}}, got {raw!r}")
    out = {}
    for name, value in raw.items():
        if name not in QUOTAS:
            raise ValueError(f"{where}: unknown quota {name!r} (known: {', '.join(QUOTAS)})")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_QUOTA:
            raise ValueError(f"{where} {name}: must be a whole number from 1 to {MAX_QUOTA} "
                             f"({QUOTAS[name]}), got {value!r}")
        out[name] = value
    return out


def parse_quota(text: str) -> dict[str, int]:
    """`images=1000,compute_s=3600,concurrent=4` -> {...}; ValueError naming the bad field."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--quota: expected NAME=VALUE[,NAME=VALUE...] with NAME one of "
                             f"{', '.join(QUOTAS)}, got {part!r}")
        if name in out:
            raise ValueError(f"--quota {name}: given twice")
        try:
            out[name] = int(value.strip())
        except ValueError:
            out[name] = value.strip()        # check_quota names it
    if not out:
        raise ValueError(f"--quota: empty (give NAME=VALUE with NAME one of {', '.join(QUOTAS)})")
    return check_quota(out, "--quota")


def utc_day(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y-%m-%d")


def until_midnight(t: float | None = None) -> int:
    """Whole seconds until the next UTC midnight (at least 1)."""
    now = datetime.fromtimestamp(time.time() if t is None else t, timezone.utc)
    nxt = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((nxt - now).total_seconds()))


# KEYS: today's quota hash, the owner's active zset
# ARGV: images limit, compute limit, concurrent limit (-1: none), n, now, job id, orphan age
# -> {0 admitted | 1 images | 2 compute_s | 3 concurrent, images used, compute used, active}
TAKE = r"""
local li, lc, la = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local n, now = tonumber(ARGV[4]), tonumber(ARGV[5])
local active = 0
if la >= 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local st = redis.call('HGET', k_job(id), 'status')
    local at = tonumber(redis.call('ZSCORE', KEYS[2], id))
    if st == 'succeeded' or st == 'failed' or st == 'canceled' or (not st and now - at > tonumber(ARGV[7])) then
      redis.call('ZREM', KEYS[2], id)
    end
  end
  active = redis.call('ZCARD', KEYS[2])
end
local q = redis.call('HMGET', KEYS[1], 'images', 'compute_s')
local imgs, comp = tonumber(q[1] or '0') or 0, tonumber(q[2] or '0') or 0
local code = 0
if li >= 0 and imgs + n > li then code = 1
elseif lc >= 0 and comp >= lc then code = 2
elseif la >= 0 and active >= la then code = 3 end
if code == 0 then
  imgs = redis.call('HINCRBY', KEYS[1], 'images', n)
  redis.call('EXPIRE', KEYS[1], QUOTA_TTL_S)
  if la >= 0 then
    redis.call('ZADD', KEYS[2], now, ARGV[6])
    active = active + 1
  end
end
return {code, imgs, tostring(comp), active}
"""


@dataclass(frozen=True)
class Taken:
    day: str
    n: int


class Quotas:
    """The quota take/refund of one Redis client, and the headers of a key's counters."""

    def __init__(self, redis, aredis=None):
        self.redis, self.aredis = redis, aredis
        self._take = redis.register_script(keys.lua_prelude() + TAKE)

    def take(self, owner: str, quota: dict, n: int, job_id: str) -> Taken:
        """Count n images and the job against the key's quota, or raise ApiError 429 naming the
        quota that is used up (nothing counted)."""
        now = time.time()
        day = utc_day(now)
        code, imgs, comp, active = self._take(
            keys=[keys.quota(owner, day), keys.active(owner)],
            args=[quota.get("images", -1), quota.get("compute_s", -1), quota.get("concurrent", -1),
                  int(n), repr(now), job_id, ORPHAN_S])
        code = int(code)
        if code == 0:
            return Taken(day, int(n))
        reset = until_midnight(now)
        if code == 1:
            left = max(0, quota["images"] - int(imgs))
            msg = (f"images quota exceeded: {quota['images']} images per UTC day, {left} left today "
                   f"and this request asks {n}; resets in {reset} s")
            field, retry = "images", reset
        elif code == 2:
            msg = (f"compute_s quota exceeded: {quota['compute_s']} compute-seconds per UTC day, "
                   f"{float(comp):.1f} used today; resets in {reset} s")
            field, retry = "compute_s", reset
        else:
            msg = (f"concurrent quota exceeded: {quota['concurrent']} jobs queued or running at once "
                   f"({int(active)} now); retry when one ends")
            field, retry = "concurrent", CONCURRENT_RETRY_S
        raise ApiError(429, "quota_exceeded", msg, field, {"quota": field, "limit": quota[field]},
                       headers={"Retry-After": str(retry)})

    def refund(self, owner: str, taken: Taken, job_id: str) -> None:
        """Undo a take whose job was never admitted (queue full, Redis refused the write)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(keys.quota(owner, taken.day), "images", -taken.n)
        pipe.zrem(keys.active(owner), job_id)
        pipe.execute()

    async def headers(self, owner: str, quota: dict) -> dict[str, str]:
        """X-RateLimit-{Limit,Remaining,Reset}-<Q> of the key's quotas, read now."""
        now = time.time()
        pipe = self.aredis.pipeline(transaction=False)
        pipe.hmget(keys.quota(owner, utc_day(now)), "images", "compute_s")
        pipe.zcard(keys.active(owner))
        (imgs, comp), active = await pipe.execute()
        used = {"images": int(imgs or 0), "compute_s": float(comp or 0), "concurrent": int(active or 0)}
        out = {}
        reset = str(until_midnight(now))
        for name, limit in quota.items():
            h = HEADER[name]
            out[f"X-RateLimit-Limit-{h}"] = str(limit)
            out[f"X-RateLimit-Remaining-{h}"] = str(max(0, math.floor(limit - used[name])))
            if name != "concurrent":
                out[f"X-RateLimit-Reset-{h}"] = reset
        return out


def queue_ahead(redis, queue: str, priority: str | None = None) -> int:
    """Jobs waiting on a model's queue that a new job would wait behind: with priorities, those of
    its priority and above; else every waiting job (RQ's list)."""
    prios = getattr(keys, "PRIORITIES", None)
    if priority and prios and priority in prios and hasattr(keys, "queued_prio"):
        pipe = redis.pipeline(transaction=False)
        for p in prios[:prios.index(priority) + 1]:
            pipe.llen(keys.queued_prio(queue, p))
        pipe.llen(keys.rq_queue(queue))
        *mine, total = pipe.execute()
        # a queue from before priorities has its ids only in RQ's list: then count them all
        return int(sum(mine)) if sum(mine) or not total else int(total)
    return int(redis.llen(keys.rq_queue(queue)))


def estimated_start_s(redis, queue: str, workers: int, slots: int,
                      priority: str | None = None) -> tuple[float | None, int, float | None]:
    """(estimated seconds until a new job on `queue` starts, jobs ahead, mean run seconds).

    The estimate: jobs ahead x mean run time / (ready workers x batch slots). The jobs ahead are
    the queue's waiting jobs (queue_ahead); the mean run time is that of the queue's last
    RUNTIMES_KEPT succeeded jobs (claim to end, measured as they ran, so batching's slowdown is
    in it); every worker runs up to `slots` jobs at once (LATENTD_WORKER_MAX_BATCH), so the queue
    drains at workers x slots / run time jobs per second. It leans early on purpose (full batches,
    a job's slot freeing the moment it ends): a request is refused only when even that start
    misses its deadline, and a job that was admitted but does start late fails deadline_exceeded
    at its claim without running a step. No measurement yet (a fresh queue): None, admitted.
    No ready worker: None with workers == 0, which the caller refuses (nothing will start it)."""
    ahead = queue_ahead(redis, queue, priority)
    times = [float(x) for x in redis.lrange(keys.runtimes(queue), 0, -1)]
    mean = sum(times) / len(times) if times else None
    if workers <= 0 or mean is None:
        return None, ahead, mean
    return ahead * mean / (workers * max(1, slots)), ahead, mean


def check_deadline(state, entry, deadline_s: int | None, priority: str | None) -> None:
    """Refuse (429, Retry-After, the estimate in the body) a job that cannot start before its
    deadline given the queue ahead of it; a job without a deadline is not looked at."""
    if deadline_s is None:
        return
    workers = len(state.models.workers().get(entry.name, ()))
    est, ahead, mean = estimated_start_s(state.redis, entry.queue, workers,
                                         state.settings.worker_max_batch, priority)
    allowed = {"deadline_s": deadline_s, "estimated_start_s": None if est is None else round(est, 2),
               "queue_ahead": ahead, "ready_workers": workers,
               "mean_run_s": None if mean is None else round(mean, 3)}
    if workers == 0:
        raise ApiError(429, "deadline_unreachable", f"deadline_s: no worker of model {entry.name!r} "
                       f"is ready, so the job cannot be known to start within {deadline_s} s; retry "
                       "later or without deadline_s", "deadline_s", allowed,
                       headers={"Retry-After": str(state.settings.retry_after_s)})
    if est is not None and est > deadline_s:
        raise ApiError(429, "deadline_unreachable", f"deadline_s: the job would start in about "
                       f"{est:.1f} s ({ahead} job(s) ahead on model {entry.name!r}), after its "
                       f"deadline of {deadline_s} s", "deadline_s", allowed,
                       headers={"Retry-After": str(max(1, math.ceil(est - deadline_s)))})

