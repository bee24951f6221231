"""Every Redis key latentd uses, in one place (torch-free; the API and the worker share it).

RQ's own keys (rq:queue:<q>, rq:job:<id>, rq:wip:<q>) are spelled here too, so that our Lua
scripts can touch them atomically alongside ours; tests/test_worker_keys.py checks that they
still match what RQ computes. Everything of ours lives under `latentd:`.
"""
from __future__ import annotations

P = "latentd"

# --- RQ's keys (rq 2.12) ------------------------------------------------------------------------
RQ_QUEUES = "rq:queues"                        # set of queue keys (rq info lists these)


def rq_queue(queue: str) -> str:
    """RQ's queue list of job ids (FIFO: RPUSH at submit, LPOP by workers)."""
    return f"rq:queue:{queue}"


def rq_job(job_id: str) -> str:
    """RQ's job hash (status, origin, data = JSON of func/args, timestamps)."""
    return f"rq:job:{job_id}"


def rq_started(queue: str) -> str:
    """RQ's StartedJobRegistry zset: "<job_id>:<execution_id>" -> expiry. We always write +inf so
    RQ's own cleanup (run by `rq info`) never moves our jobs to its failed registry; our leases
    decide instead."""
    return f"rq:wip:{queue}"


# --- ours ---------------------------------------------------------------------------------------
def job(job_id: str) -> str:
    """Job record hash (see docs/CONTRACTS.md §2, 'Redis layout')."""
    return f"{P}:job:{job_id}"


def image(job_id: str, k: int) -> str:
    """PNG bytes of image k (RedisStore)."""
    return f"{P}:img:{job_id}:{k}"


def init_image(job_id: str) -> str:
    """An edit's inputs while the job needs them: hash {image: PNG, mask: PNG}, written at submit,
    deleted when the job ends (worker/state.py end_job), TTL result_ttl_s as a backstop."""
    return f"{P}:init:{job_id}"


def leases(queue: str) -> str:
    """zset job_id -> lease expiry (unix s) for every running job; the reaper requeues expired."""
    return f"{P}:{queue}:leases"


def wait(queue: str, owner: str) -> str:
    """An owner's waiting job ids, FIFO (the same ids are in rq_queue, in arrival order)."""
    return f"{P}:{queue}:wait:{owner}"


def owners(queue: str) -> str:
    """Owners that have waiting jobs, rotated by each claim: claims take turns across API keys."""
    return f"{P}:{queue}:owners"


def workers(queue: str) -> str:
    """zset worker name -> heartbeat expiry (unix s)."""
    return f"{P}:{queue}:workers"


def worker(name: str) -> str:
    """Worker info hash: pid, host, model (JSON of ModelInfo), started_at, state. Has a TTL."""
    return f"{P}:worker:{name}"


def inbox(name: str) -> str:
    """A worker's inbox list: ids moved off the queue by a blocking BLMOVE while idle, claimed
    from there; a dead worker's inbox goes back to the queue front (reaper)."""
    return f"{P}:inbox:{name}"


def done_channel(job_id: str) -> str:
    """Pub/sub channel published once when the job reaches a terminal status (wait())."""
    return f"{P}:done:{job_id}"


def events(job_id: str) -> str:
    """Redis stream of a job's events (running, progress, preview, image, final status); its
    entry ids are the SSE event ids that Last-Event-ID resumes from (worker/events.py)."""
    return f"{P}:events:{job_id}"


def watch(job_id: str) -> str:
    """zset listener id -> preview interval in steps: someone follows this job's events, so its
    worker publishes progress and previews (nobody listening: nothing is published)."""
    return f"{P}:watch:{job_id}"


RECENT_MAX = 50                                # ids kept per owner in recent(owner)


def recent(owner: str) -> str:
    """An owner's most recent job ids, newest first (GET /v1/jobs); ids of expired jobs are
    skipped when read."""
    return f"{P}:recent:{owner}"


WEBHOOKS_DUE = f"{P}:webhooks:due"            # zset job id -> unix time its delivery is due


def webhook(job_id: str) -> str:
    """Hash of one pending webhook delivery: url, attempts, first_at, body, last_error."""
    return f"{P}:webhook:{job_id}"
