"""Every Redis key latentd uses, in one place (torch-free; the API and the worker share it).

RQ's own keys (rq:queue:<q>, rq:job:<id>, rq:wip:<q>) are spelled here too, so that our Lua
scripts can touch them atomically alongside ours; tests/test_worker_keys.py checks that they
still match what RQ computes. Everything of ours lives under `latentd:`.

Each key is a template in TEMPLATES; the Python functions below format it, and `lua_prelude()`
turns the same templates into Lua functions (k_job(id), k_wait(queue, owner), ...) that the
scripts of jobs/state.py and jobs/webhooks.py start with, so no script spells a key name.
The scripts derive per-job keys from ids they read (a claim pops an id, then touches its record),
which KEYS cannot name in advance; latentd therefore needs one Redis, not a Cluster.
"""
from __future__ import annotations

from functools import cache
from string import Formatter

P = "latentd"

TEMPLATES = {
    # RQ's (rq 2.12)
    "rq_queue": "rq:queue:{queue}",
    "rq_job": "rq:job:{job_id}",
    "rq_started": "rq:wip:{queue}",
    # ours
    "job": P + ":job:{job_id}",
    "image": P + ":img:{job_id}:{k}",
    "init_image": P + ":init:{job_id}",
    "checkpoint": P + ":ckpt:{job_id}",
    "leases": P + ":{queue}:leases",
    "wait": P + ":{queue}:wait:{owner}",
    "owners": P + ":{queue}:owners",
    "wait_prio": P + ":{queue}:{priority}:wait:{owner}",
    "owners_prio": P + ":{queue}:{priority}:owners",
    "queued_prio": P + ":{queue}:queued:{priority}",
    "passed_over": P + ":{queue}:passed_over",
    "workers": P + ":{queue}:workers",
    "worker": P + ":worker:{name}",
    "inbox": P + ":inbox:{name}",
    "done_channel": P + ":done:{job_id}",
    "events": P + ":events:{job_id}",
    "watch": P + ":watch:{job_id}",
    "recent": P + ":recent:{owner}",
    "webhook": P + ":webhook:{job_id}",
    "ratelimit": P + ":ratelimit:{owner}",
    "idempotency": P + ":idem:{owner}:{key_hash}",
    "sdapi_model": P + ":sdapi:model:{owner}",
    "quota": P + ":quota:{owner}:{day}",
    "active": P + ":active:{owner}",
    "usage": P + ":usage:{owner}:{day}",
    "runtimes": P + ":{queue}:runtimes",
}


def _key(template: str, /, **parts) -> str:
    return TEMPLATES[template].format(**parts)


def model_queue(base: str, model: str, default: str) -> str:
    """The queue of one model of a deployment: the default model's is LATENTD_QUEUE_NAME itself
    (a one-model deployment keeps the keys it always had), every other's `<base>.<model>`; each
    queue has its own RQ list, fair per-owner wait lists, leases and workers."""
    return base if model == default else f"{base}.{model}"

# --- RQ's keys (rq 2.12) ------------------------------------------------------------------------
RQ_QUEUES = "rq:queues"                        # set of queue keys (rq info lists these)


def rq_queue(queue: str) -> str:
    """RQ's queue list of job ids (FIFO: RPUSH at submit, LPOP by workers)."""
    return _key("rq_queue", queue=queue)


def rq_job(job_id: str) -> str:
    """RQ's job hash (status, origin, data = JSON of func/args, timestamps)."""
    return _key("rq_job", job_id=job_id)


def rq_started(queue: str) -> str:
    """RQ's StartedJobRegistry zset: "<job_id>:<execution_id>" -> expiry. We always write +inf so
    RQ's own cleanup (run by `rq info`) never moves our jobs to its failed registry; our leases
    decide instead."""
    return _key("rq_started", queue=queue)


# --- ours ---------------------------------------------------------------------------------------
def job(job_id: str) -> str:
    """Job record hash (see docs/CONTRACTS.md, 'Redis layout')."""
    return _key("job", job_id=job_id)


def image(job_id: str, k: int) -> str:
    """The encoded bytes of image k, in the job's output_format (RedisStore)."""
    return _key("image", job_id=job_id, k=k)


def init_image(job_id: str) -> str:
    """An edit's inputs while the job needs them: hash {image: PNG, mask: PNG}, written at submit,
    deleted when the job ends (jobs/state.py end_job), TTL result_ttl_s as a backstop."""
    return _key("init_image", job_id=job_id)


def checkpoint(job_id: str) -> str:
    """A running job's saved row states (model/row_state.py bytes), hash image index -> bytes:
    written fenced by attempt every few steps (jobs/state.py SAVE_ROWS), read when a requeued
    job is claimed again so it resumes there; an image's field goes when it is recorded, the key
    when the job ends, and its TTL (result_ttl_s) is a backstop."""
    return _key("checkpoint", job_id=job_id)


def leases(queue: str) -> str:
    """zset job_id -> lease expiry (unix s) for every running job; the reaper requeues expired."""
    return _key("leases", queue=queue)


def wait(queue: str, owner: str) -> str:
    """An owner's waiting job ids, FIFO (the same ids are in rq_queue, in arrival order)."""
    return _key("wait", queue=queue, owner=owner)


def owners(queue: str) -> str:
    """Owners that have waiting jobs, rotated by each claim: claims take turns across API keys."""
    return _key("owners", queue=queue)


# Priorities (jobs/request.py PRIORITIES), claimed in this order. A `normal` job keeps the keys
# above (wait, owners), so a deployment's queue from before priorities drains unchanged; `high`
# and `low` have their own per-owner wait lists and owner rotations.
PRIORITIES = ("high", "normal", "low")


def wait_of(queue: str, priority: str, owner: str) -> str:
    """An owner's waiting ids of one priority, FIFO."""
    return wait(queue, owner) if priority == "normal" else _key("wait_prio", queue=queue,
                                                                 priority=priority, owner=owner)


def owners_of(queue: str, priority: str) -> str:
    """Owners with waiting jobs of one priority, rotated by each claim of that priority."""
    return owners(queue) if priority == "normal" else _key("owners_prio", queue=queue, priority=priority)


def queued_prio(queue: str, priority: str) -> str:
    """The waiting ids of one priority in arrival order (a job's queue_position counts the
    higher priorities' lengths, then its place here)."""
    return _key("queued_prio", queue=queue, priority=priority)


def passed_over(queue: str) -> str:
    """Hash priority -> claims that took a higher priority while this one had jobs waiting;
    at jobs/state.py PASSED_OVER_MAX the next claim takes this priority (starvation bound)."""
    return _key("passed_over", queue=queue)


def workers(queue: str) -> str:
    """zset worker name -> heartbeat expiry (unix s)."""
    return _key("workers", queue=queue)


def worker(name: str) -> str:
    """Worker info hash: pid, host, model (JSON of ModelInfo), started_at, state. Has a TTL."""
    return _key("worker", name=name)


def inbox(name: str) -> str:
    """A worker's inbox list: ids moved off the queue by a blocking BLMOVE while idle, claimed
    from there; a dead worker's inbox goes back to the queue front (reaper)."""
    return _key("inbox", name=name)


def done_channel(job_id: str) -> str:
    """Pub/sub channel published once when the job reaches a terminal status (wait())."""
    return _key("done_channel", job_id=job_id)


def events(job_id: str) -> str:
    """Redis stream of a job's events (running, progress, preview, image, final status); its
    entry ids are the SSE event ids that Last-Event-ID resumes from (jobs/events.py)."""
    return _key("events", job_id=job_id)


def watch(job_id: str) -> str:
    """zset listener id -> preview interval in steps: someone follows this job's events, so its
    worker publishes progress and previews (nobody listening: nothing is published)."""
    return _key("watch", job_id=job_id)


RECENT_MAX = 50                                # ids kept per owner in recent(owner)


def recent(owner: str) -> str:
    """An owner's most recent job ids, newest first (GET /v1/jobs); ids of expired jobs are
    skipped when read."""
    return _key("recent", owner=owner)


WEBHOOKS_DUE = f"{P}:webhooks:due"            # zset job id -> unix time its delivery is due


def webhook(job_id: str) -> str:
    """Hash of one pending webhook delivery: url, attempts, first_at, body, last_error."""
    return _key("webhook", job_id=job_id)


def ratelimit(owner: str) -> str:
    """An owner's token bucket (app/ratelimit.py): hash tokens, ts."""
    return _key("ratelimit", owner=owner)


def idempotency(owner: str, key_hash: str) -> str:
    """An owner's Idempotency-Key (its sha256, so any header value makes a short, safe key name):
    hash {job_id, fp (the resolved request's fingerprint), state pending|admitted, at}, TTL
    LATENTD_IDEMPOTENCY_TTL_S once admitted (jobs/idempotency.py)."""
    return _key("idempotency", owner=owner, key_hash=key_hash)


def sdapi_model(owner: str) -> str:
    """The model an owner chose with POST /sdapi/v1/options (sd_model_checkpoint): its default
    for /sdapi requests that name none. A plain string, no TTL."""
    return _key("sdapi_model", owner=owner)


QUOTA_TTL_S = 2 * 86400                       # a day's quota counters outlive the day, then go
USAGE_TTL_S = 400 * 86400                     # usage kept per day: a year and a bit (GET /v1/usage)
RUNTIMES_KEPT = 20                            # recent run times per queue (deadline estimates)


def quota(owner: str, day: str) -> str:
    """An owner's quota counters of one UTC day (YYYY-MM-DD), hash {images: admitted images
    (refunded when a job ends without them), compute_s: compute-seconds of jobs that ended that
    day}; written only for keys with a quota (app/quota.py), TTL QUOTA_TTL_S."""
    return _key("quota", owner=owner, day=day)


def active(owner: str) -> str:
    """zset job id -> admission time: an owner's queued and running jobs, for its `concurrent`
    quota; end_job removes an id, and admission prunes ids whose job ended or was never written."""
    return _key("active", owner=owner)


def usage(owner: str, day: str) -> str:
    """An owner's usage of one UTC day (the day a job ended), hash "<queue>|images",
    "<queue>|compute_s", "<queue>|steps", "<queue>|jobs" (a queue is one model's), written by
    end_job (jobs/state.py) for every job, TTL USAGE_TTL_S; read by GET /v1/usage."""
    return _key("usage", owner=owner, day=day)


def runtimes(queue: str) -> str:
    """The run seconds (claim to end) of the queue's last RUNTIMES_KEPT succeeded jobs, newest
    first: the measured rate of the admission's deadline estimate (app/quota.py)."""
    return _key("runtimes", queue=queue)


@cache
def lua_prelude() -> str:
    """Lua functions k_<name>(parts...) for every template, e.g.
    `local function k_wait(queue, owner) return 'latentd:' .. queue .. ':wait:' .. owner end`,
    and the fixed keys as K_WEBHOOKS_DUE, K_RQ_QUEUES."""
    lines = [f"local K_RQ_QUEUES = '{RQ_QUEUES}'", f"local K_WEBHOOKS_DUE = '{WEBHOOKS_DUE}'",
             f"local QUOTA_TTL_S = {QUOTA_TTL_S}", f"local USAGE_TTL_S = {USAGE_TTL_S}",
             f"local RUNTIMES_KEPT = {RUNTIMES_KEPT}"]
    for name, template in TEMPLATES.items():
        args, parts = [], []
        for literal, field, _spec, _conv in Formatter().parse(template):
            if literal:
                parts.append(f"'{literal}'")
            if field:
                args.append(field)
                parts.append(field)
        lines.append(f"local function k_{name}({', '.join(args)}) return {' .. '.join(parts)} end")
    return "\n".join(lines) + "\n"
