"""The job state machine's typed interface: each transition of jobs/state.py (a Lua script)
as one method that builds its KEYS and ARGV, so callers never depend on their order.

Used by the API's JobClient (admit, finish as cancel), the worker's main loop (claim,
record_image, finish as fail, touch, requeue) and its heartbeat thread (touch, reap).
Torch-free.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import IntEnum

from latentd.jobs import keys
from latentd.jobs.state import (ADMIT, CLAIM, FINISH, IMAGE, PASSED_OVER_MAX, REAP, REQUEUE, SAVE_ROWS,
                                TOUCH, rq_time)


@dataclass(frozen=True)
class Claim:
    """A job this worker now runs, fenced by `attempt`."""
    job_id: str
    attempt: int
    spec_json: bytes
    done: frozenset[int]           # images an earlier attempt already recorded


class ImageResult(IntEnum):
    NOT_OURS = -1                  # canceled, or re-claimed by a newer attempt
    DUPLICATE = 0                  # this image was recorded already
    RECORDED = 1
    SUCCEEDED = 2                  # recorded, and it was the job's last: the job ended


class FinishResult(IntEnum):
    NOT_OURS = -1                  # a fenced finish from an attempt that is not the current one
    ALREADY_ENDED = 0
    ENDED = 1


@dataclass(frozen=True)
class Touch:
    """One held job in a lease refresh: its attempt and the progress fields to write
    ({"p:<k>": steps}; empty when nothing moved)."""
    job_id: str
    attempt: int
    progress: dict[str, int]


@dataclass(frozen=True)
class Reaped:
    requeued: int
    failed: int
    dead_workers: int


def _lost(raw) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in raw or ()]


class JobStore:
    """The scripts registered on one Redis client (EVALSHA, reloaded on NOSCRIPT after a
    restart), for one queue. ttl_s: how long a finished job's record, images and events live."""

    def __init__(self, redis, queue: str, ttl_s: float):
        self.redis = redis
        self.queue = queue
        self.ttl = int(ttl_s)

        def reg(body: str):
            return redis.register_script(keys.lua_prelude() + body)

        self._admit, self._finish, self._claim = reg(ADMIT), reg(FINISH), reg(CLAIM)
        self._touch, self._image, self._reap, self._requeue = reg(TOUCH), reg(IMAGE), reg(REAP), reg(REQUEUE)
        self._save_rows = reg(SAVE_ROWS)

    # --- the API side --------------------------------------------------------------------------
    def admit_on(self, pipe, job_id: str, owner: str, cap: int, fields: dict,
                 priority: str = "normal", rq_fields: dict | None = None,
                 rate: tuple[float, int, int] | None = None, recent: tuple[int, int] = (keys.RECENT_MAX, 86400),
                 idempotency: tuple[str, int] | None = None) -> None:
        """Queue the whole admission (jobs/state.py ADMIT) on `pipe` as a bare EVALSHA (one round
        trip with the caller's other writes; redis-py's Script in a pipeline would first ask
        SCRIPT EXISTS). `pipe` may also be the client itself: then the call runs at once.
        rq_fields: RQ's job hash; rate: (tokens/s, burst, cost) of the owner's token bucket, None
        for no rate limit; recent: (ids kept, ttl s) of the owner's recent list; idempotency:
        (its Redis key, ttl s) to mark admitted. Its result is [0, depth] admitted, [1, depth]
        the queue was full, [2, wait ms] rate limited (nothing written on a refusal).
        On NoScriptError (Redis restarted) call load_admit() and run it again."""
        q = self.queue
        idem_key, idem_ttl = idempotency or (keys.job(job_id), 0)
        ks = [keys.rq_queue(q), keys.rq_job(job_id), keys.job(job_id), keys.RQ_QUEUES,
              keys.wait_of(q, priority, owner), keys.owners_of(q, priority), keys.queued_prio(q, priority),
              keys.recent(owner), keys.ratelimit(owner), idem_key]
        rate_s, burst, cost = rate or (0, 0, 0)
        rq_fields = rq_fields or {}
        argv = [int(cap), job_id, owner, rate_s, burst, cost, recent[0], recent[1], max(0, int(idem_ttl)),
                len(rq_fields)]
        for k, v in rq_fields.items():
            argv += (k, v)
        for k, v in fields.items():
            argv += (k, v)
        return pipe.evalsha(self._admit.sha, len(ks), *ks, *argv)

    def load_admit(self) -> None:
        self.redis.script_load(self._admit.script)

    def finish(self, job_id: str, status: str, error: dict | None, *, owner: str = "",
               attempt: int | None = None, now: float | None = None,
               compute_s: float = 0.0) -> FinishResult | None:
        """End a queued or running job. owner: only if it is theirs ('' = any); attempt: only if
        that attempt is the running one (None = unfenced). None: no such job (or not theirs).
        compute_s: the worker's compute on images it did not record (a job stopped mid-run),
        added to the job's compute_s as it ends, so usage and quotas charge it."""
        now = time.time() if now is None else now
        res = self._finish(keys=[keys.job(job_id)],
                           args=[job_id, owner, "" if attempt is None else attempt, status,
                                 json.dumps(error) if error else "", repr(now), self.ttl, rq_time(now),
                                 repr(float(compute_s))])
        return None if res is None else FinishResult(int(res))

    # --- the worker side -----------------------------------------------------------------------
    def claim(self, worker: str, lease_s: float, now: float | None = None,
              lowest: str = "low") -> Claim | None:
        """The next job: by priority (with jobs/state.py's starvation bound), then fairly across
        owners (this worker's inbox first), leased until now + lease_s; None when the queue is
        empty. lowest: take no job of a lower priority than this (a full worker claims only
        what outranks its running work)."""
        now = time.time() if now is None else now
        q = self.queue
        got = self._claim(keys=[keys.rq_queue(q), keys.inbox(worker), keys.leases(q), keys.rq_started(q),
                                keys.owners(q)],
                          args=[worker, repr(now), repr(now + lease_s), rq_time(now), q,
                                keys.PRIORITIES.index(lowest) + 1, PASSED_OVER_MAX])
        if not got:
            return None
        return Claim(got[0].decode(), int(got[1]), got[2], frozenset(json.loads(got[3])))

    def record_image(self, job_id: str, attempt: int, k: int, meta_json: str, compute_s: float,
                     steps: int, now: float | None = None) -> ImageResult:
        """Record image k's metadata (its bytes are in the image store already); the job
        succeeds with its last image."""
        now = time.time() if now is None else now
        res = self._image(keys=[keys.job(job_id)],
                          args=[job_id, attempt, k, meta_json, repr(float(compute_s)), steps, repr(now),
                                self.ttl, rq_time(now)])
        return ImageResult(int(res))

    def _touch_args(self, worker: str, lease_s: float, worker_ttl_s: float, held: list[Touch], now: float):
        return {"keys": [keys.leases(self.queue), keys.workers(self.queue)],
                "args": [repr(now + lease_s), worker, repr(now + worker_ttl_s),
                         json.dumps([[t.job_id, t.attempt, t.progress] for t in held])]}

    def touch(self, worker: str, lease_s: float, worker_ttl_s: float, held: list[Touch],
              now: float | None = None) -> list[str]:
        """Refresh the worker's heartbeat and the leases of `held` (fenced by attempt), write
        their progress; returns the ids that are no longer this worker's (canceled, requeued)."""
        now = time.time() if now is None else now
        return _lost(self._touch(**self._touch_args(worker, lease_s, worker_ttl_s, held, now)))

    def touch_on(self, pipe, worker: str, lease_s: float, worker_ttl_s: float, held: list[Touch],
                 now: float | None = None) -> None:
        """touch() queued on a pipeline; read its result with lost_ids()."""
        now = time.time() if now is None else now
        self._touch(**self._touch_args(worker, lease_s, worker_ttl_s, held, now), client=pipe)

    lost_ids = staticmethod(_lost)

    def requeue(self, job_id: str, attempt: int) -> bool:
        """Graceful stop: hand a held job back to the queue front; False if it is not ours."""
        q = self.queue
        return bool(self._requeue(keys=[keys.job(job_id), keys.leases(q), keys.rq_queue(q), keys.rq_started(q)],
                                  args=[job_id, attempt, q]))

    # --- checkpoints (saved row states, model/row_state.py) ------------------------------------
    def save_rows_on(self, pipe, job_id: str, attempt: int, rows: dict[int, bytes]) -> None:
        """Queue a fenced save of image index -> row-state bytes on `pipe` (one round trip for
        all held jobs); its result in pipe.execute() is -1 (not ours) or the rows saved."""
        argv = [attempt, self.ttl]
        for k, data in rows.items():
            argv += [int(k), data]
        self._save_rows(keys=[keys.job(job_id), keys.checkpoint(job_id)], args=argv, client=pipe)

    def save_rows(self, job_id: str, attempt: int, rows: dict[int, bytes]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        self.save_rows_on(pipe, job_id, attempt, rows)
        return int(pipe.execute()[0])

    def checkpoints(self, job_id: str) -> dict[int, bytes]:
        """The job's saved row states by image index (empty when none)."""
        return {int(k): v for k, v in self.redis.hgetall(keys.checkpoint(job_id)).items()}

    def reap(self, max_attempts: int, limit: int = 100, now: float | None = None) -> Reaped:
        """Requeue (front) or fail the jobs whose lease expired; return dead workers' inboxes."""
        now = time.time() if now is None else now
        q = self.queue
        res = self._reap(keys=[keys.leases(q), keys.rq_queue(q), keys.workers(q)],
                         args=[repr(now), int(max_attempts), self.ttl, rq_time(now), int(limit), q])
        return Reaped(*(int(x) for x in res))
