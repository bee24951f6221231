"""JobClient: everything the API does with the queue (torch-free; docs/CONTRACTS.md §2).

submit() puts one RQ job (JSON serializer; nothing pickled) on the queue and writes our job
record in one round trip; the rate limit, the queue-cap check and every write happen in one Lua
script, so the queue never exceeds its cap and a rejected request enqueues nothing. Every read takes the caller's
owner and answers None for a job that is not theirs, so the API can turn it into a 404 without
telling "exists" from "doesn't".
"""
from __future__ import annotations

import json
import re
import time
import uuid
import zlib

from redis.exceptions import NoScriptError, RedisError

from latentd.jobs import keys
from latentd.jobs.events import WATCH_TTL_S
from latentd.jobs.idempotency import key_hash
from latentd.jobs.jobstore import FinishResult, JobStore
from latentd.jobs.models import deployment
from latentd.jobs.spec import JobSpec
from latentd.jobs.state import TERMINAL, record_to_dict, rq_time
from latentd.jobs.store import make_store

RQ_FUNC = "latentd.worker.loop.rq_entry"   # what `rq info`/RQ tools show; only latentd workers run it
_ID = re.compile(r"^[0-9a-f]{32}$")


def output_format(spec_json: bytes | None) -> str:
    """The format a job's images were encoded in, from its record's spec (the worker encodes what
    the spec asks for); PNG, the default, when there is no record."""
    return json.loads(spec_json or b"{}").get("output_format") or "png"


class QueueFull(Exception):
    """The global queue cap is reached; the API answers 503 with Retry-After."""

    def __init__(self, depth: int, cap: int):
        super().__init__(f"queue is full ({depth}/{cap} jobs waiting)")
        self.depth, self.cap = depth, cap


class RateLimited(Exception):
    """The owner's token bucket (rate= of submit) has too few tokens: retry in `wait_s` seconds."""

    def __init__(self, wait_s: float):
        super().__init__(f"rate limited; retry in {wait_s:.3f} s")
        self.wait_s = max(0.001, wait_s)


class NotReplicated(Exception):
    """WAIT saw fewer replicas than LATENTD_REDIS_MIN_REPLICAS in time. `canceled`: the job was
    canceled by this refusal; False: it had already ended (a fast job can finish within the wait),
    so it is kept, and a retry with the same Idempotency-Key gets it instead of running again."""

    def __init__(self, want: int, wait_ms: int, canceled: bool):
        super().__init__(f"admission not acknowledged by {want} Redis replica(s) in {wait_ms} ms")
        self.want, self.wait_ms, self.canceled = want, wait_ms, canceled


def rq_job_fields(job_id: str, queue: str, spec_json: str, iso: str, timeout: int, result_ttl: int,
                  description: str) -> dict:
    """RQ's job hash for a queued job that runs RQ_FUNC(spec) (what rq.job.Job.create(...).to_dict()
    writes with the JSON serializer; built here without RQ's machinery, which cost more CPU than
    the rest of an admission): `rq info` and RQ's Job.fetch read it as their own."""
    data = '["' + RQ_FUNC + '", null, [' + spec_json + '], {}]'
    return {"created_at": iso, "data": zlib.compress(data.encode()), "success_callback_name": "",
            "failure_callback_name": "", "stopped_callback_name": "", "started_at": "", "ended_at": "",
            "last_heartbeat": "", "worker_name": "", "group_id": "", "origin": queue,
            "description": description, "enqueued_at": iso, "timeout": timeout, "result_ttl": result_ttl,
            "status": "queued"}


def _replicated(acks, want: int) -> bool:
    return isinstance(acks, int) and acks >= want


class JobClient:
    def __init__(self, redis, settings):
        self.redis = redis
        self.settings = settings
        self.deployed = deployment(settings)   # the default model first; each has its own queue
        self.queue = self.deployed[0].queue      # the default model's
        self._stores = {m.queue: JobStore(redis, m.queue, settings.result_ttl_s) for m in self.deployed}
        self.jobs = self._stores[self.queue]
        self.store = make_store(redis, settings)

    def queue_of(self, model: str | None) -> str | None:
        """The queue of a model of the deployment (None: the default model's); None if unknown."""
        if model is None:
            return self.queue
        return next((m.queue for m in self.deployed if m.name == model), None)

    # --- writes -------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, callback_url: str | None = None,
               watch: tuple[str, int] | None = None, init: dict[str, bytes] | None = None,
               queue: str | None = None, job_id: str | None = None,
               idempotency: tuple[str, str, int] | None = None, record: dict | None = None,
               rate: tuple[float, int, int] | None = None) -> str:
        """Enqueue a validated spec on `queue` (a model's: queue_of; None: the default model's);
        returns the job id. Raises QueueFull (nothing enqueued; the cap is per queue), and
        RateLimited when `rate` = (tokens/s, burst, cost) is given and the owner's token bucket
        (app/ratelimit.py) is short of `cost` (nothing enqueued, no token taken). All of it is one
        Lua script (jobs/state.py ADMIT): the rate limit, cap, RQ job, record, queues and marks.
        callback_url: POST the record there when the job ends (jobs/webhooks.py; checked by the
        caller). watch: (listener id, preview every k steps) registered before the job can be
        claimed, so its worker publishes progress and previews from the first step
        (jobs/events.py). init: an edit's {"image": PNG, "mask": PNG}, stored under
        keys.init_image until the job ends (never in the spec, the RQ job or the record the owner
        reads). job_id: the id reserved by an Idempotency-Key claim (else a new one);
        idempotency: (owner, key, ttl_s) of that claim, marked admitted in the same round trip.
        record: more fields of the job record (the quota day, `qday`, of a job counted against a
        key's quota: jobs/state.py refunds and charges it when the job ends).

        Redis refusing the writes (OOM, READONLY) raises its ResponseError with nothing admitted
        (the script writes all or nothing; an edit's inputs are removed again). With LATENTD_REDIS_MIN_REPLICAS
        the admission WAITs for that many replicas; past LATENTD_REDIS_WAIT_MS the job is
        canceled and NotReplicated raised (see docs/operations.md for the exact promise)."""
        spec = spec.with_seed()
        queue = queue or self.queue
        jobs = self._stores.get(queue) or JobStore(self.redis, queue, self.settings.result_ttl_s)
        job_id = job_id or uuid.uuid4().hex
        now = time.time()
        spec_json = spec.to_json()
        rq_fields = rq_job_fields(job_id, queue, spec_json, rq_time(now),
                                  int(spec.timeout_s or self.settings.job_timeout_s) + 1,
                                  int(self.settings.result_ttl_s), f"latentd job {job_id} ({spec.n} image(s))")
        fields = {"id": job_id, "owner": spec.owner, "queue": queue, "spec": spec_json,
                  "n": spec.n, "steps": spec.run_steps, "status": "queued", "created_at": repr(now),
                  "attempt": 0, "compute_s": 0, "done": 0, "priority": spec.priority}
        if callback_url:
            fields["callback"] = callback_url
        fields.update(record or {})
        idem = None
        if idempotency is not None:
            owner, key, ttl = idempotency
            idem = (keys.idempotency(owner, key_hash(key)), max(1, int(ttl)))
        ttl = int(self.settings.result_ttl_s)
        min_replicas = self.settings.redis_min_replicas
        plain = watch is None and not init and min_replicas <= 0
        for tries in (1, 2):
            # One round trip: the admission script alone, or in a pipeline with an edit's inputs,
            # a listener and the replication WAIT; after a Redis restart, load the script and retry.
            pipe = self.redis if plain else self.redis.pipeline(transaction=False)
            if watch is not None:
                pipe.zadd(keys.watch(job_id), {watch[0]: int(watch[1])})
                pipe.expire(keys.watch(job_id), WATCH_TTL_S)
            if init:
                pipe.hset(keys.init_image(job_id), mapping=init)
                pipe.expire(keys.init_image(job_id), ttl)
            try:
                res = jobs.admit_on(pipe, job_id, spec.owner, self.settings.queue_cap, fields, spec.priority,
                                    rq_fields=rq_fields, rate=rate, recent=(keys.RECENT_MAX, ttl),
                                    idempotency=idem)
            except NoScriptError:
                if tries == 2:
                    raise
                jobs.load_admit()
                continue
            if not plain:
                at = len(pipe) - 1                  # the admission script: queued last so far
                if min_replicas > 0:
                    pipe.execute_command("WAIT", min_replicas, self.settings.redis_wait_ms)
                results = pipe.execute(raise_on_error=False)
                res = results[at]
                if isinstance(res, NoScriptError) and tries == 1:
                    jobs.load_admit()
                    continue
                if isinstance(res, Exception):     # OOM, READONLY...: nothing was admitted
                    self._undo(job_id)
                    raise res
            break
        code, value = int(res[0]), int(res[1])
        if code != 0:
            if init:
                self._undo(job_id)
            if code == 1:
                raise QueueFull(value, self.settings.queue_cap)
            raise RateLimited(value / 1000)
        if min_replicas > 0 and not _replicated(results[-1], min_replicas):
            res = jobs.finish(job_id, "canceled", {"code": "replication_timeout", "message":
                              "admission not acknowledged by a Redis replica in time"}, owner=spec.owner)
            raise NotReplicated(min_replicas, self.settings.redis_wait_ms, canceled=res == FinishResult.ENDED)
        return job_id

    def _undo(self, job_id: str) -> None:
        """Remove an edit's inputs written beside a refused admission (deletes pass even under OOM)."""
        try:
            self.redis.delete(keys.init_image(job_id))
        except RedisError:
            pass

    def cancel(self, job_id: str, owner: str) -> dict | None:
        """Cancel: a queued job leaves the queue and never runs; a running one is marked canceled
        now and its worker drops it at its next step. A terminal job is returned unchanged."""
        if not _ID.match(job_id or ""):
            return None
        res = self.jobs.finish(job_id, "canceled", {"code": "canceled", "message": "canceled by the owner"},
                               owner=owner)
        if res is None:
            return None
        return self.get(job_id, owner)

    # --- reads --------------------------------------------------------------------------------
    def get(self, job_id: str, owner: str) -> dict | None:
        if not _ID.match(job_id or ""):
            return None
        rec = self.redis.hgetall(keys.job(job_id))
        if not rec or rec.get(b"owner", b"").decode() != owner:
            return None
        position = None
        if rec.get(b"status") == b"queued":
            position = self._position(rec, job_id)
        return record_to_dict(rec, position)

    def _position(self, rec: dict, job_id: str) -> int:
        """Jobs claimed before this one (about: fairness across owners reorders a priority): every
        waiting job of a higher priority, then those ahead of it in its own priority's arrival
        order. A job queued before priorities existed is found in RQ's list instead."""
        queue = (rec.get(b"queue") or self.queue.encode()).decode()
        prio = (rec.get(b"priority") or b"normal").decode()
        prio = prio if prio in keys.PRIORITIES else "normal"
        pipe = self.redis.pipeline(transaction=False)
        for p in keys.PRIORITIES[:keys.PRIORITIES.index(prio)]:
            pipe.llen(keys.queued_prio(queue, p))
        pipe.lpos(keys.queued_prio(queue, prio), job_id)
        pipe.lpos(keys.rq_queue(queue), job_id)
        *ahead, pos, rq_pos = pipe.execute()
        if pos is None:
            pos = rq_pos
        return sum(ahead) + (0 if pos is None else int(pos))   # None: being claimed right now

    def wait(self, job_id: str, owner: str, timeout_s: float) -> dict | None:
        """The job dict once terminal, or as it is after timeout_s. Subscribes before reading,
        so a completion between the read and the wait is not missed."""
        deadline = time.monotonic() + timeout_s
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.done_channel(job_id))
            while True:
                d = self.get(job_id, owner)
                if d is None or d["status"] in TERMINAL:
                    return d
                left = deadline - time.monotonic()
                if left <= 0:
                    return d
                # wake on the done message, or re-read at least every 2 s (belt and braces)
                pubsub.get_message(timeout=min(left, 2.0))
        finally:
            pubsub.close()

    def image_bytes(self, job_id: str, k: int, owner: str) -> bytes | None:
        """Stored bytes of image k of the caller's own job, in the job's output_format (PNG by
        default; jobs.encode.media_type tells which); a flagged image is stored black unless its job
        asked moderation=low (a key with that permission)."""
        if not _ID.match(job_id or "") or not isinstance(k, int) or k < 0:
            return None
        own, img, spec = self.redis.hmget(keys.job(job_id), "owner", f"img:{k}", "spec")
        if own is None or own.decode() != owner or img is None:
            return None
        return self.store.get(job_id, k, output_format(spec))

    def presigned_url(self, job_id: str, k: int, ttl_s: int) -> str:
        """The object store's GET URL for image k (S3Store only); the object's name carries the
        job's format, read from its record."""
        fmt = output_format(self.redis.hget(keys.job(job_id), "spec"))
        return self.store.presigned_url(job_id, k, fmt, ttl_s)

    def recent(self, owner: str, limit: int) -> list[dict]:
        """The owner's most recent jobs that still exist, newest first (at most `limit`)."""
        ids = [i.decode() for i in self.redis.lrange(keys.recent(owner), 0, max(0, limit - 1))]
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        out = []
        for rec in pipe.execute():
            if rec and rec.get(b"owner", b"").decode() == owner:
                out.append(record_to_dict(rec))
        return out

    def webhooks_pending(self) -> int:
        return int(self.redis.zcard(keys.WEBHOOKS_DUE))

    def queue_depth(self, queue: str | None = None) -> int:
        return int(self.redis.llen(keys.rq_queue(queue or self.queue)))

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting per model of the deployment (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for m in self.deployed:
            pipe.llen(keys.rq_queue(m.queue))
        return {m.name: int(n) for m, n in zip(self.deployed, pipe.execute())}

    def workers_by_model(self) -> dict[str, list[dict]]:
        """Ready workers per model of the deployment (an empty list: the model has none)."""
        return {m.name: self.ready_workers(m.queue) for m in self.deployed}

    def ready_workers(self, queue: str | None = None) -> list[dict]:
        """Workers with a loaded model whose heartbeat is fresh, serving `queue` (None: the
        default model's)."""
        names = self.redis.zrangebyscore(keys.workers(queue or self.queue), time.time(), "+inf")
        if not names:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.worker(name.decode()))
        out = []
        for info in pipe.execute():
            if not info:
                continue
            d = {k.decode(): v.decode() for k, v in info.items()}
            if d.get("state") not in ("ready", "busy"):
                continue
            d["model"] = json.loads(d.get("model", "null"))
            for f in ("pid", "running", "metrics_port"):
                if f in d:
                    d[f] = int(d[f])
            out.append(d)
        return out

    def all_ready_workers(self) -> list[dict]:
        """Ready workers of every model of the deployment."""
        return [w for ws in self.workers_by_model().values() for w in ws]

    def models(self) -> list[dict]:
        """ModelInfo dicts (model.info.ModelInfo.to_dict) that ready workers publish, one per
        model name."""
        seen = {}
        for w in self.all_ready_workers():
            m = w.get("model")
            if m and m.get("name") not in seen:
                seen[m["name"]] = m
        return list(seen.values())
