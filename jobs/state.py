"""Job records and their transitions, as Lua scripts so each transition is atomic in Redis.

Why Lua: after a lease expires, a job can be re-run by another worker while the first (slow,
not dead) one is still writing. Every write a worker makes is *fenced* by the attempt number it
got when it claimed the job: a write from an older attempt, or to a job no longer `running`, is
refused. So a job ends exactly once (the first terminal transition wins), and each image is
recorded exactly once (the first `img:<k>` write wins). Callers go through jobs/jobstore.py,
which builds each script's KEYS and ARGV; torch-free.

Record (hash keys.job(id)); times are unix seconds as strings:
  id owner queue spec(JSON) n steps status created_at started_at finished_at attempt worker
  execution(the rq:wip member) error(JSON {code,message}) compute_s done(images recorded)
  graceful(requeues on graceful stop, not counted against max_attempts) lost_worker
  p:<k>(steps done of image k)  img:<k>(JSON {index, seed, nsfw, warnings, timings})
  resumed_from_step(the progress step the current attempt went on from, written with its
  progress by TOUCH; set on a re-run)
  callback(webhook URL, set at submit; end_job queues its delivery)
  priority(high|normal|low, set at submit; absent: normal)
  parked(1 while the worker has set the job's image(s) aside for higher-priority work, else 0)
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from latentd.jobs.events import MAXLEN as EVENTS_MAXLEN

TERMINAL = ("succeeded", "failed", "canceled")
# Starvation bound of the claim order: a priority that had jobs waiting while this many claims in
# a row took a higher priority is taken by the next claim (of a worker that may take it). So with
# a steady stream of high jobs, one normal job and one low job are claimed after at most 8 high
# ones (a low job waits at most about 2 x 8 claims: normal may be passed over too).
PASSED_OVER_MAX = 8


def rq_time(t: float | None = None) -> str:
    """RQ's timestamp format (rq.utils.utcformat)."""
    t = time.time() if t is None else t
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Every script starts with keys.lua_prelude() (k_job(id), k_wait(queue, owner), ...): key names
# live in jobs/keys.py only. Shared Lua: fair-queue bookkeeping, and end_job (the caller has
# checked that it may): removes the lease and the RQ started entry, mirrors the status into RQ's
# job hash, sets the TTLs, publishes once.
# Priorities: each has its own per-owner wait lists and owner rotation (normal keeps the
# pre-priority key names, jobs/keys.py wait_of / owners_of) and an arrival-order list
# (queued_prio) for queue positions.
_FAIR = r"""
local PRIOS = {'high', 'normal', 'low'}
local function prio_of(id)
  local p = redis.call('HGET', k_job(id), 'priority')
  if p == 'high' or p == 'low' then return p end
  return 'normal'
end
local function k_w(queue, prio, owner)
  if prio == 'normal' then return k_wait(queue, owner) end
  return k_wait_prio(queue, prio, owner)
end
local function k_o(queue, prio)
  if prio == 'normal' then return k_owners(queue) end
  return k_owners_prio(queue, prio)
end
local function unwait(queue, owner, id)
  local prio = prio_of(id)
  local w = k_w(queue, prio, owner)
  redis.call('LREM', w, 0, id)
  if redis.call('LLEN', w) == 0 then redis.call('LREM', k_o(queue, prio), 0, owner) end
  redis.call('LREM', k_queued_prio(queue, prio), 0, id)
end
local function rewait_front(queue, owner, id)
  local prio = prio_of(id)
  local w = k_w(queue, prio, owner)
  if redis.call('LPUSH', w, id) == 1 then
    redis.call('LPUSH', k_o(queue, prio), owner)
  end
  redis.call('LPUSH', k_queued_prio(queue, prio), id)
  redis.call('LPUSH', k_rq_queue(queue), id)
end
"""

# Accounting when a job ends, in the same transition (so it happens exactly once): the owner's
# usage of the UTC day it ended (GET /v1/usage; by queue, i.e. by model), the owner's quota
# counters (only for a job admitted under a quota: it carries `qday`, the UTC day its images were
# counted): images it did not make are refunded to that day, its compute-seconds charged to
# today; it leaves the owner's concurrent set; a succeeded job's run time feeds the deadline
# estimate (keys.runtimes).
_ACCOUNT = r"""
local function account(id, queue, status, now, iso)
  local rec = k_job(id)
  local r = redis.call('HMGET', rec, 'owner', 'compute_s', 'done', 'n', 'steps', 'qday', 'started_at')
  local owner = r[1] or ''
  local compute = tonumber(r[2] or '0') or 0
  local done = tonumber(r[3] or '0') or 0
  local n = tonumber(r[4] or '0') or 0
  local steps = tonumber(r[5] or '0') or 0
  local ran = 0
  for k = 0, n - 1 do ran = ran + math.min(tonumber(redis.call('HGET', rec, 'p:' .. k) or '0') or 0, steps) end
  local day = string.sub(iso, 1, 10)
  local u = k_usage(owner, day)
  redis.call('HINCRBY', u, queue .. '|jobs', 1)
  redis.call('HINCRBY', u, queue .. '|images', done)
  redis.call('HINCRBY', u, queue .. '|steps', ran)
  redis.call('HINCRBYFLOAT', u, queue .. '|compute_s', string.format('%.6f', compute))
  redis.call('EXPIRE', u, USAGE_TTL_S)
  redis.call('ZREM', k_active(owner), id)
  if r[6] and r[6] ~= '' then
    if n > done then redis.call('HINCRBY', k_quota(owner, r[6]), 'images', done - n) end
    local q = k_quota(owner, day)
    redis.call('HINCRBYFLOAT', q, 'compute_s', string.format('%.6f', compute))
    redis.call('EXPIRE', q, QUOTA_TTL_S)
  end
  if status == 'succeeded' and r[7] then
    local rt = k_runtimes(queue)
    redis.call('LPUSH', rt, string.format('%.3f', math.max(0, tonumber(now) - tonumber(r[7]))))
    redis.call('LTRIM', rt, 0, RUNTIMES_KEPT - 1)
  end
end
"""

_END = _FAIR + _ACCOUNT + r"""
local function end_job(id, queue, status, err, now, ttl, iso)
  local rec = k_job(id)
  local exe = redis.call('HGET', rec, 'execution')
  redis.call('LREM', k_rq_queue(queue), 0, id)
  unwait(queue, redis.call('HGET', rec, 'owner') or '', id)
  redis.call('HSET', rec, 'status', status, 'finished_at', now)
  if err ~= '' then redis.call('HSET', rec, 'error', err) end
  redis.call('ZREM', k_leases(queue), id)
  if exe and exe ~= '' then redis.call('ZREM', k_rq_started(queue), exe) end
  local rqs = ({succeeded='finished', failed='failed', canceled='canceled'})[status]
  redis.call('HSET', k_rq_job(id), 'status', rqs, 'ended_at', iso)
  redis.call('EXPIRE', rec, ttl)
  redis.call('EXPIRE', k_rq_job(id), ttl)
  redis.call('DEL', k_init_image(id))   -- an edit's init image: not needed any more
  redis.call('DEL', k_checkpoint(id))   -- saved row states: nothing left to resume
  account(id, queue, status, now, iso)
  redis.call('PUBLISH', k_done_channel(id), status)
  -- the final event of the job's event stream (jobs/events.py), in the same transition
  local ev = k_events(id)
  redis.call('XADD', ev, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', status)
  redis.call('EXPIRE', ev, ttl)
  -- a webhook delivery is state in Redis from the moment the job ends (jobs/webhooks.py)
  local cb = redis.call('HGET', rec, 'callback')
  if cb and cb ~= '' and redis.call('EXISTS', k_webhook(id)) == 0 then
    redis.call('HSET', k_webhook(id), 'url', cb, 'attempts', 0, 'first_at', now)
    redis.call('EXPIRE', k_webhook(id), ttl)
    redis.call('ZADD', K_WEBHOOKS_DUE, now, id)
  end
end
""".replace("EVENTS_MAXLEN", str(EVENTS_MAXLEN))

# The whole admission in one script, so it is one round trip and all or nothing (a refusal writes
# nothing; Redis refusing the first write, OOM or READONLY, refuses it all): the owner's token
# bucket (app/ratelimit.py, when rate > 0), the queue cap, RQ's job hash, the record, the fair-queue
# lists, the owner's recent ids and the Idempotency-Key's `admitted` mark (when idem ttl > 0).
# KEYS: rq queue, rq job, record, rq:queues, owner's wait list, owners (both of the job's
#   priority), the priority's arrival list, owner's recent ids, owner's token bucket,
#   Idempotency-Key record
# ARGV: cap, id, owner, rate (tokens/s; 0: no rate limit), burst, cost, recent kept, recent ttl,
#   idempotency ttl (0: none), number of RQ job fields R, then R field/value pairs of RQ's job
#   hash, then field/value pairs of the record
# -> {0, queue depth} admitted | {1, depth} queue full | {2, wait ms} rate limited
ADMIT = r"""
local cap, rate = tonumber(ARGV[1]), tonumber(ARGV[4])
local burst, cost, now, tokens
if rate > 0 then
  burst, cost = tonumber(ARGV[5]), tonumber(ARGV[6])
  local now_t = redis.call('TIME')
  now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
  local b = redis.call('HMGET', KEYS[9], 't', 'ts')
  local ts
  tokens, ts = tonumber(b[1]), tonumber(b[2])
  if tokens == nil or ts == nil then tokens = burst; ts = now end
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  if tokens < cost then
    redis.call('HSET', KEYS[9], 't', tostring(tokens), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[9], math.ceil(burst * 1000 / rate) + 1000)
    return {2, math.ceil((cost - tokens) * 1000 / rate)}
  end
end
if cap > 0 then
  local depth = redis.call('LLEN', KEYS[1])
  if depth >= cap then return {1, depth} end     -- refused: nothing written, no token taken
end
if rate > 0 then
  redis.call('HSET', KEYS[9], 't', tostring(tokens - cost), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[9], math.ceil(burst * 1000 / rate) + 1000)
end
local nrq = tonumber(ARGV[10])
local rq_end = 10 + 2 * nrq
redis.call('HSET', KEYS[2], unpack(ARGV, 11, rq_end))
redis.call('HSET', KEYS[3], unpack(ARGV, rq_end + 1))
redis.call('SADD', KEYS[4], KEYS[1])
if redis.call('RPUSH', KEYS[5], ARGV[2]) == 1 then redis.call('RPUSH', KEYS[6], ARGV[3]) end
redis.call('RPUSH', KEYS[7], ARGV[2])
redis.call('LPUSH', KEYS[8], ARGV[2])
redis.call('LTRIM', KEYS[8], 0, tonumber(ARGV[7]) - 1)
redis.call('EXPIRE', KEYS[8], ARGV[8])
if tonumber(ARGV[9]) > 0 then
  redis.call('HSET', KEYS[10], 'state', 'admitted')
  redis.call('EXPIRE', KEYS[10], ARGV[9])
end
return {0, redis.call('RPUSH', KEYS[1], ARGV[2])}
"""

# KEYS: record   ARGV: id, owner ('' = any), attempt ('' = unfenced), status, error JSON, now, ttl, iso,
#   compute_s (optional: the worker's compute on images not recorded, charged as the job ends)
# -> nil unknown/other owner; 0 already terminal; -1 not this attempt's; 1 ended now
FINISH = _END + r"""
local r = redis.call('HMGET', KEYS[1], 'owner', 'status', 'attempt', 'queue')
if not r[1] then return nil end
if ARGV[2] ~= '' and r[1] ~= ARGV[2] then return nil end
if r[2] ~= 'queued' and r[2] ~= 'running' then return 0 end
if ARGV[3] ~= '' and (r[2] ~= 'running' or r[3] ~= ARGV[3]) then return -1 end
if ARGV[9] and ARGV[9] ~= '' and tonumber(ARGV[9]) > 0 then
  redis.call('HINCRBYFLOAT', KEYS[1], 'compute_s', ARGV[9])
end
end_job(ARGV[1], r[4], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
return 1
"""

# Priority first: high, then normal, then low, except that a priority passed over
# PASSED_OVER_MAX times while it had jobs waiting goes first (the starvation bound, counted in
# the passed_over hash). Within a priority, fair across owners (API key names): owners with
# waiting jobs take turns (round robin over that priority's owners list), FIFO within an owner;
# RQ's queue list holds every waiting id in arrival order.
# KEYS: queue, inbox, leases, rq started, owners   ARGV: worker, now, lease expiry, iso, queue name,
#   lowest priority to take (1 high .. 3 low: a full worker claims only what outranks its work),
#   PASSED_OVER_MAX
# -> false, or {id, attempt, spec, done-indexes JSON}
CLAIM = _FAIR + r"""
local q, lowest, bound = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local function pick()
  local waiting, chosen = {}, nil
  for l = 1, 3 do waiting[l] = redis.call('LLEN', k_o(q, PRIOS[l])) > 0 end
  for l = lowest, 2, -1 do
    if waiting[l] and tonumber(redis.call('HGET', k_passed_over(q), PRIOS[l]) or '0') >= bound then
      chosen = l
      break
    end
  end
  if not chosen then
    for l = 1, lowest do if waiting[l] and not chosen then chosen = l end end
  end
  if not chosen then return nil end
  redis.call('HDEL', k_passed_over(q), PRIOS[chosen])
  for l = chosen + 1, 3 do
    if waiting[l] then redis.call('HINCRBY', k_passed_over(q), PRIOS[l], 1) end
  end
  return PRIOS[chosen]
end
for i = 1, 1000 do
  local id = nil
  if lowest == 3 then id = redis.call('LPOP', KEYS[2]) end
  if id then
    unwait(q, redis.call('HGET', k_job(id), 'owner') or '', id)
  else
    local prio = pick()
    if prio then
      local ok = k_o(q, prio)
      local owner = redis.call('LMOVE', ok, ok, 'LEFT', 'RIGHT')
      local w = k_w(q, prio, owner)
      id = redis.call('LPOP', w)
      if redis.call('LLEN', w) == 0 then redis.call('LREM', ok, 0, owner) end
      if id then
        redis.call('LREM', KEYS[1], 1, id)
        redis.call('LREM', k_queued_prio(q, prio), 1, id)
      else
        id = ''
      end
    elseif lowest == 3 then
      id = redis.call('LPOP', KEYS[1])      -- ids pushed by something other than submit()
      if not id then return false end
    else
      return false
    end
  end
  local rec = k_job(id)
  if id ~= '' and redis.call('HGET', rec, 'status') == 'queued' then
    local attempt = redis.call('HINCRBY', rec, 'attempt', 1)
    local exe = id .. ':' .. ARGV[1] .. '.' .. attempt
    redis.call('HSET', rec, 'status', 'running', 'worker', ARGV[1], 'execution', exe)
    redis.call('HSETNX', rec, 'started_at', ARGV[2])
    redis.call('ZADD', KEYS[3], ARGV[3], id)
    redis.call('ZADD', KEYS[4], '+inf', exe)
    redis.call('HSET', k_rq_job(id), 'status', 'started', 'started_at', ARGV[4],
               'worker_name', ARGV[1], 'last_heartbeat', ARGV[4])
    local n = tonumber(redis.call('HGET', rec, 'n'))
    local done = {}
    for k = 0, n - 1 do
      if redis.call('HEXISTS', rec, 'img:' .. k) == 1 then table.insert(done, k)
      else redis.call('HSET', rec, 'p:' .. k, 0) end   -- a re-run starts this image over
    end
    return {id, attempt, redis.call('HGET', rec, 'spec'), cjson.encode(done)}
  end
end
return false
"""

# KEYS: leases, workers   ARGV: lease expiry, worker, worker expiry, progress JSON
#   progress JSON: [[id, attempt, {"p:0": 3, ...}], ...]  -> ids that are no longer ours
TOUCH = r"""
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
local lost = {}
for _, e in ipairs(cjson.decode(ARGV[4])) do
  local rec = k_job(e[1])
  local r = redis.call('HMGET', rec, 'status', 'attempt')
  if r[1] == 'running' and r[2] == tostring(e[2]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], e[1])
    local f = {}
    for k, v in pairs(e[3]) do table.insert(f, k); table.insert(f, v) end
    if #f > 0 then redis.call('HSET', rec, unpack(f)) end
  else
    table.insert(lost, e[1])
  end
end
return lost
"""

# KEYS: record  ARGV: id, attempt, k, image JSON, compute_s, steps, now, ttl, iso
# -> -1 not ours; 0 image already recorded; 1 recorded; 2 recorded and the job succeeded
IMAGE = _END + r"""
local r = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'n', 'queue')
if r[1] ~= 'running' or r[2] ~= ARGV[2] then return -1 end
if redis.call('HSETNX', KEYS[1], 'img:' .. ARGV[3], ARGV[4]) == 0 then return 0 end
redis.call('HDEL', k_checkpoint(ARGV[1]), ARGV[3])     -- this image will not be resumed
redis.call('XADD', k_events(ARGV[1]), 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', 'image', 'data', ARGV[4])
redis.call('EXPIRE', k_events(ARGV[1]), ARGV[8])
redis.call('HSET', KEYS[1], 'p:' .. ARGV[3], ARGV[6])
redis.call('HINCRBYFLOAT', KEYS[1], 'compute_s', ARGV[5])
if redis.call('HINCRBY', KEYS[1], 'done', 1) >= tonumber(r[3]) then
  end_job(ARGV[1], r[4], 'succeeded', '', ARGV[7], ARGV[8], ARGV[9])
  return 2
end
return 1
""".replace("EVENTS_MAXLEN", str(EVENTS_MAXLEN))

# Checkpoints: the row states (model/row_state.py bytes) of a running job's images, fenced like
# every worker write: only the attempt that runs the job may save, and an image already recorded
# gets no checkpoint. KEYS: record, checkpoint hash   ARGV: attempt, ttl, k, bytes, k, bytes, ...
# -> -1 not ours (canceled, requeued, ended); else the number of rows saved
SAVE_ROWS = r"""
local r = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if r[1] ~= 'running' or r[2] ~= ARGV[1] then return -1 end
local saved = 0
for i = 3, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], 'img:' .. ARGV[i]) == 0 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    saved = saved + 1
  end
end
if saved > 0 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
return saved
"""

# KEYS: leases, queue, workers   ARGV: now, max attempts, ttl, iso, limit, queue name
# -> {requeued, failed, dead workers}
REAP = _END + r"""
local requeued, failed = 0, 0
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[5]))
for _, id in ipairs(ids) do
  local rec = k_job(id)
  local r = redis.call('HMGET', rec, 'status', 'attempt', 'execution', 'worker', 'graceful', 'owner')
  redis.call('ZREM', KEYS[1], id)
  if r[1] == 'running' then
    if tonumber(r[2]) - tonumber(r[5] or 0) >= tonumber(ARGV[2]) then
      local err = cjson.encode({code='worker_lost', message='the worker running this job stopped '
        .. 'heartbeating ' .. r[2] .. ' time(s) (killed or hung); giving up after ' .. ARGV[2] .. ' attempts'})
      end_job(id, ARGV[6], 'failed', err, ARGV[1], ARGV[3], ARGV[4])
      failed = failed + 1
    else
      if r[3] then redis.call('ZREM', k_rq_started(ARGV[6]), r[3]) end
      redis.call('HSET', rec, 'status', 'queued', 'execution', '', 'lost_worker', r[4] or '')
      redis.call('HSET', k_rq_job(id), 'status', 'queued')
      rewait_front(ARGV[6], r[6] or '', id)
      requeued = requeued + 1
    end
  end
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, name in ipairs(dead) do
  local inbox = k_inbox(name)
  while redis.call('LMOVE', inbox, KEYS[2], 'RIGHT', 'LEFT') do end
  redis.call('ZREM', KEYS[3], name)
end
return {requeued, failed, #dead}
"""

# Graceful stop: hand a held job back to the queue front (not counted against max_attempts).
# KEYS: record, leases, queue, rq started  ARGV: id, attempt, queue name -> 1 requeued, 0 not ours
REQUEUE = _FAIR + r"""
local r = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'execution', 'owner')
if r[1] ~= 'running' or r[2] ~= ARGV[2] then return 0 end
if r[3] then redis.call('ZREM', KEYS[4], r[3]) end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'graceful', 1)
redis.call('HSET', KEYS[1], 'status', 'queued', 'execution', '')
redis.call('HSET', k_rq_job(ARGV[1]), 'status', 'queued')
rewait_front(ARGV[3], r[4] or '', ARGV[1])
return 1
"""


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def record_to_dict(rec: dict, position: int | None = None) -> dict:
    """The job dict of docs/CONTRACTS.md §2 from a raw record hash (bytes or str keys)."""
    r = {_s(k): _s(v) for k, v in rec.items()}
    spec = json.loads(r.get("spec", "{}"))
    n = int(r.get("n", 1))
    steps = int(r.get("steps", 0))

    def t(name):
        v = r.get(name)
        return float(v) if v else None

    images = sorted((json.loads(v) for k, v in r.items() if k.startswith("img:")),
                    key=lambda d: d["index"])
    step = sum(min(int(r.get(f"p:{k}", 0) or 0), steps) for k in range(n))
    params = {k: v for k, v in spec.items() if k not in ("owner", "version", "timeout_s")}
    return {
        "id": r.get("id"),
        "kind": spec.get("kind", "text"),
        "status": r.get("status"),
        "queue_position": position,
        # parked: set aside (its state kept) while the worker runs higher-priority work
        "progress": {"step": step, "total": steps * n, "parked": r.get("parked") == "1"},
        "created_at": t("created_at"),
        "started_at": t("started_at"),
        "finished_at": t("finished_at"),
        "images": images,
        "error": json.loads(r["error"]) if r.get("error") else None,
        # what GET /v1/usage sums (end_job's accounting counts the same fields): images
        # recorded, denoising steps run (the progress), compute charged
        "usage": {"compute_seconds": round(float(r.get("compute_s", 0) or 0), 6),
                  "images": int(r.get("done", 0) or 0), "steps": step},
        "attempts": int(r.get("attempt", 0) or 0),
        # progress step a re-run went on from (saved rows + images done before); None: not re-run
        "resumed_from_step": int(r["resumed_from_step"]) if r.get("resumed_from_step") else None,
        "params": params,
    }
