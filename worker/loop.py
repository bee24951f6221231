"""`latentd worker`: the long-lived worker process (issues 3, 5, 6).

Loads the pipeline ONCE, never forks. The main loop pulls jobs straight off RQ's queue with our
own atomic claim (RQ has no batch dequeue, and its worker forks per job), expands a job of n
images into n requests with seeds S+k, and drives the BatchExecutor: each `iterate()` is one
batched U-Net step over every running request. Around it, in this order each tick:

  compute  -> events into memory (progress) and an outbox (images, failures); job timeouts.
  Redis    -> flush the outbox (fenced writes, see worker/state.py), progress + cancel check
              (throttled, one Lua call for all held jobs), claim more work while the executor
              has room, or block briefly on the queue when idle.

Redis errors only pause the Redis half: computing goes on, the outbox is kept and flushed when
Redis is back (AOF keeps what was admitted). Leases, worker heartbeat and the reaper run on a
separate thread (worker/recovery.py). SIGTERM: stop claiming, finish held work for up to
`grace_s`, hand the rest back to the queue front.
"""
from __future__ import annotations

import json
import logging
import signal
import socket
import os
import threading
import time
from dataclasses import dataclass, field

from worker import keys, metrics
from worker.png import encode_png
from worker.recovery import REDIS_ERRORS, Heartbeat, connect
from worker.spec import JobSpec
from worker.state import Scripts, rq_time
from worker.store import StoreError, make_store

log = logging.getLogger("latentd.worker")


def rq_entry(*_args, **_kwargs):
    """The function name RQ records for our jobs. Only `latentd worker` runs them (batched, in
    process); a stock `rq worker` on this queue must not."""
    raise RuntimeError("latentd jobs are run by `latentd worker`, not by `rq worker`")


@dataclass
class Held:
    """A job this worker has claimed (fenced by `attempt`)."""
    job_id: str
    attempt: int
    spec: JobSpec
    claimed_at: float
    deadline: float                        # monotonic
    todo: set[int] = field(default_factory=set)
    progress: dict[int, int] = field(default_factory=dict)
    dirty: bool = False
    ending: bool = False                   # a terminal write is queued; ignore further events

    def rid(self, k: int) -> str:
        return f"{self.job_id}.{k}.{self.attempt}"


def parse_rid(rid: str) -> tuple[str, int, int]:
    job_id, k, attempt = rid.split(".")
    return job_id, int(k), int(attempt)


def resolve_device(settings) -> tuple[str, object]:
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if settings.dtype == "auto":
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    return device, dtype


class Worker:
    def __init__(self, settings):
        self.s = settings
        self.name = (settings.worker_name or f"{socket.gethostname()}-{os.getpid()}").replace(":", "_")
        self.grace_s = settings.worker_grace_s
        self.held: dict[str, Held] = {}
        self._held_lock = threading.Lock()
        self.outbox: list[tuple] = []
        self.stopping = False
        self.last_touch = 0.0
        self.last_sweep = time.monotonic()
        self.unet_calls = 0
        self.images = 0

    # --- setup --------------------------------------------------------------------------------
    def held_snapshot(self) -> list[tuple[str, int]]:
        with self._held_lock:
            return [(h.job_id, h.attempt) for h in self.held.values()]

    def _on_signal(self, signum, _frame):
        log.info("signal %d: stopping (finishing held work for up to %.0fs)", signum, self.grace_s)
        self.stopping = True

    def setup(self) -> None:
        from model.pipeline import load_pipeline
        from worker.executor import BatchExecutor

        s = self.s
        self.redis = connect(s.redis_url)
        self.scripts = Scripts(self.redis)
        self.store = make_store(self.redis, s)
        self.store.prepare()
        self.q = s.queue_name
        stall_s = s.job_timeout_s + 2 * s.lease_s + 60
        self.hb = Heartbeat(s, self.name, self.held_snapshot, stall_s)
        self.hb.start()                                  # visible as "loading" at once
        self.device, dtype = resolve_device(s)
        t = time.perf_counter()
        self.pipe = load_pipeline(s.model, device=self.device, dtype=dtype, safety=s.safety)
        metrics.MODEL_LOAD.set(time.perf_counter() - t)
        self.model_name = self.pipe.info.name
        self.new_executor = lambda: BatchExecutor(self.pipe, max_batch=s.worker_max_batch,
                                                  memory_budget_mb=s.worker_memory_budget_mb or None)
        self.ex = self.new_executor()
        self.governor = None
        if self.device == "cpu":                 # share the cores with whatever else runs here
            import torch

            from latentd.cpu import ThreadGovernor
            self.governor = ThreadGovernor(torch.get_num_threads(), torch.set_num_threads)
        self.metrics_port = metrics.serve(s.worker_metrics_port)
        metrics.STALLED.set_function(lambda: float(time.monotonic() - self.hb.last_progress > stall_s))
        metrics.update_device_memory(self.device)
        where = {}
        if self.metrics_port:
            # published so that ops (and `latentd workers`) can find every worker's /metrics
            host = metrics.advertised_host(s.redis_url)
            where = {"metrics_port": self.metrics_port,
                     "metrics_url": f"http://{host}:{self.metrics_port}/metrics"}
            log.info("worker %s metrics on %s", self.name, where["metrics_url"])
        self.hb.set_info(state="ready", model=json.dumps(self.pipe.info.to_dict()),
                         device=self.device, max_batch=s.worker_max_batch, **where)
        log.info("worker %s ready: model %s on %s in %.1fs", self.name, self.model_name,
                 self.device, time.perf_counter() - t)

    # --- main loop ----------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self.setup()
        except Exception as e:  # noqa: BLE001 - a worker that cannot load must say why and exit
            log.error("worker %s cannot start: %s: %s", self.name, type(e).__name__, e)
            if getattr(self, "hb", None) is not None:
                self.hb.stop()
            return 2
        backoff, grace_end, retry_at, down = 0.5, None, 0.0, False
        while True:
            self.hb.last_progress = time.monotonic()
            if self.stopping:
                grace_end = grace_end or time.monotonic() + self.grace_s
                if (not self.held and not self.outbox) or time.monotonic() > grace_end:
                    break
            self.compute()
            if time.monotonic() < retry_at:        # Redis was down: keep computing, retry later
                if self.ex.idle:
                    time.sleep(min(0.1, retry_at - time.monotonic()))
                continue
            try:
                self.redis_phase()
                if down:
                    log.info("Redis is back; %d result(s) to write", len(self.outbox))
                backoff, down = 0.5, False
            except REDIS_ERRORS as e:
                metrics.REDIS_ERRORS.inc()
                if not down:
                    log.warning("Redis unavailable (%s); computing on, %d result(s) kept, "
                                "reconnecting with backoff", e, len(self.outbox))
                down, retry_at = True, time.monotonic() + backoff
                backoff = min(backoff * 2, 5.0)
        self.shutdown()
        return 0

    def compute(self) -> None:
        """One executor iteration; everything it yields goes to memory or the outbox."""
        for job_id in self.hb.pop_lost():
            self.drop(job_id, "lost")
        self.check_timeouts()
        if self.ex.idle:
            return
        if self.governor is not None:
            self.governor.tick()
        t = time.perf_counter()
        try:
            events = self.ex.iterate()
        except Exception as e:  # noqa: BLE001 - an engine bug must not take the worker down
            log.exception("executor iteration failed; failing its jobs")
            for h in list(self.held.values()):
                self.fail(h, "engine_error", f"{type(e).__name__}: {e}"[:500])
            self.ex = self.new_executor()
            return
        dt = time.perf_counter() - t
        from worker.executor import Failed, Finished, Progress

        stepped = 0
        for ev in events:
            job_id, k, attempt = parse_rid(ev.request_id)
            h = self.held.get(job_id)
            if h is None or h.attempt != attempt or h.ending:
                continue
            if isinstance(ev, Progress):
                stepped += 1
                h.progress[k] = ev.step
                h.dirty = True
            elif isinstance(ev, Finished):
                self.finished(h, k, ev)
            elif isinstance(ev, Failed):
                self.fail(h, ev.code, ev.message)
        if stepped:
            self.unet_calls += 1
            metrics.UNET_CALLS.inc()
            metrics.STEP_TIME.observe(dt)
            metrics.BATCH_SIZE.observe(stepped)
        metrics.RUNNING.set(self.ex.running_count)
        metrics.WAITING.set(self.ex.waiting_count)

    def finished(self, h: Held, k: int, ev) -> None:
        img = ev.image
        png = encode_png(img.image, h.spec.params(), img.seed, self.model_name)
        meta = {"index": k, "seed": img.seed, "nsfw": bool(img.nsfw), "width": img.image.width,
                "height": img.image.height, "warnings": list(img.warnings or []),
                "timings": {a: round(float(b), 4) for a, b in (img.timings or {}).items()}}
        h.todo.discard(k)
        h.progress[k] = h.spec.steps
        self.outbox.append(("image", h.job_id, h.attempt, k, png, json.dumps(meta), ev.compute_s))
        self.images += 1
        metrics.IMAGES.inc()
        if img.nsfw:
            metrics.FLAGGED.inc()
        metrics.COMPUTE.labels(key=h.spec.owner).inc(ev.compute_s)
        if self.images:
            metrics.UNET_PER_IMAGE.set(self.unet_calls / self.images)

    def fail(self, h: Held, code: str, message: str) -> None:
        """End the job as failed (once): its other requests leave the batch at once."""
        if h.ending:
            return
        h.ending = True
        for k in h.todo:
            self.ex.cancel(h.rid(k))
        self.outbox.append(("fail", h.job_id, h.attempt, code, message))
        metrics.FAILURES.labels(reason=code).inc()
        log.warning("job %s failed: %s: %s", h.job_id, code, message)

    def check_timeouts(self) -> None:
        now = time.monotonic()
        for h in list(self.held.values()):
            if not h.ending and h.todo and now > h.deadline:    # (all done: only writes left)
                limit = h.spec.timeout_s or self.s.job_timeout_s
                self.fail(h, "timeout", f"the job ran longer than its timeout of {limit:g}s")

    def drop(self, job_id: str, why: str) -> None:
        """Forget a job that is no longer ours (canceled, requeued elsewhere, or ended)."""
        with self._held_lock:
            h = self.held.pop(job_id, None)
        if h is None:
            return
        for k in h.todo:
            self.ex.cancel(h.rid(k))
        if why != "ended":
            log.info("job %s dropped (%s)", job_id, why)

    # --- Redis --------------------------------------------------------------------------------
    def redis_phase(self) -> None:
        self.flush()
        now = time.monotonic()
        if now - self.last_touch >= self.s.progress_interval_s:
            self.touch()
            self.last_touch = now
        if not self.stopping:
            self.claim_more()
        if self.ex.idle and not self.held and not self.outbox and not self.stopping:
            self.hb.set_info(state="ready", running=0)
            # block briefly on the queue; the id moves into our inbox, then claim() takes it --
            # unless a stop signal came meanwhile (stopping, the inbox goes back to the queue)
            if self.redis.blmove(keys.rq_queue(self.q), keys.inbox(self.name), 1.0, "LEFT", "RIGHT") \
                    and not self.stopping:
                self.claim_more()
        if now - self.last_sweep > 600:
            self.last_sweep = now
            self.store.sweep()

    def flush(self) -> None:
        """Write pending results in order; a Redis error leaves the rest for the next tick."""
        ttl = int(self.s.result_ttl_s)
        while self.outbox:
            item = self.outbox[0]
            now = time.time()
            if item[0] == "image":
                _, job_id, attempt, k, png, meta, compute_s = item
                try:
                    self.store.put(job_id, k, png, ttl)
                except StoreError as e:
                    # the image cannot be kept: fail its job (once, clearly) and go on
                    self.outbox = [x for x in self.outbox     # its other images: same fate
                                   if not (x[0] == "image" and x[1] == job_id and x[2] == attempt)]
                    h = self.held.get(job_id)
                    if h is not None and h.attempt == attempt:
                        self.fail(h, "storage_error", f"could not store image {k}: {e}"[:500])
                    continue
                res = self.scripts.image(keys=[keys.job(job_id)],
                                         args=[job_id, attempt, k, meta, repr(float(compute_s)),
                                               self.held_steps(job_id), repr(now), ttl, rq_time(now)])
                if res == 2:
                    self.ended(job_id, "succeeded")
                elif res == -1:
                    self.drop(job_id, "not ours any more")
            else:
                _, job_id, attempt, code, message = item
                self.scripts.finish(keys=[keys.job(job_id)],
                                    args=[job_id, "", attempt, "failed",
                                          json.dumps({"code": code, "message": message}),
                                          repr(now), ttl, rq_time(now)])
                self.ended(job_id, "failed")
            self.outbox.pop(0)

    def held_steps(self, job_id: str) -> int:
        h = self.held.get(job_id)
        return h.spec.steps if h else 0

    def ended(self, job_id: str, status: str) -> None:
        h = self.held.get(job_id)
        if h is not None:
            metrics.JOBS.labels(status=status).inc()
            metrics.RUN_TIME.observe(time.time() - h.claimed_at)
        self.drop(job_id, "ended")

    def touch(self) -> None:
        """Progress of every held job + lease refresh, one Lua call; drop jobs no longer ours
        (canceled by the owner, or requeued after our lease lapsed)."""
        if not self.held:
            return
        entries = []
        for h in list(self.held.values()):
            prog = {f"p:{k}": v for k, v in h.progress.items()} if h.dirty else {}
            h.dirty = False
            entries.append([h.job_id, h.attempt, prog])
        now = time.time()
        lost = self.scripts.touch(
            keys=[keys.leases(self.q), keys.workers(self.q)],
            args=[repr(now + self.s.lease_s), self.name, repr(now + 3 * self.hb.interval),
                  json.dumps(entries)])
        for j in lost:
            self.drop(j.decode(), "canceled or requeued")
        self.hb.set_info(state="busy", running=self.ex.running_count)

    def room(self) -> int:
        return self.s.worker_max_batch - (self.ex.running_count + self.ex.waiting_count)

    def claim_more(self) -> None:
        while self.room() > 0:
            now = time.time()
            got = self.scripts.claim(
                keys=[keys.rq_queue(self.q), keys.inbox(self.name), keys.leases(self.q),
                      keys.rq_started(self.q), keys.owners(self.q)],
                args=[self.name, repr(now), repr(now + self.s.lease_s), rq_time(now), self.q])
            if not got:
                return
            self.start_job(got[0].decode(), int(got[1]), got[2], set(json.loads(got[3])), now)

    def start_job(self, job_id: str, attempt: int, spec_json: bytes, done: set[int], now: float) -> None:
        from model.errors import InvalidRequest
        from model.pipeline import GenerationRequest

        try:
            spec = JobSpec.from_json(spec_json)
        except ValueError as e:
            spec = None
            err = ("invalid_request", f"unreadable job spec: {e}"[:500])
        timeout = (spec.timeout_s if spec and spec.timeout_s else self.s.job_timeout_s)
        h = Held(job_id, attempt, spec or JobSpec(prompt="", owner="?"), now,
                 time.monotonic() + timeout)
        with self._held_lock:
            self.held[job_id] = h
        if spec is None:
            self.fail(h, *err)
            return
        created = self.redis.hget(keys.job(job_id), "created_at")
        if attempt == 1 and created:
            metrics.QUEUE_WAIT.observe(max(0.0, now - float(created)))
        if spec.model not in (None, "", self.model_name):
            self.fail(h, "invalid_request", f"model: {spec.model!r} is not served by this "
                                            f"worker (it serves {self.model_name!r})")
            return
        reqs = {}
        try:
            for k in range(spec.n):
                if k in done:
                    continue
                req = GenerationRequest(**spec.image_request_kwargs(k))
                self.pipe.validate(req)
                reqs[k] = req
        except InvalidRequest as e:
            self.fail(h, "invalid_request", str(e))
            return
        h.todo = set(reqs)
        h.progress = {k: 0 for k in reqs}
        for k, req in reqs.items():
            self.ex.add(h.rid(k), spec.owner, req)
        log.info("job %s attempt %d: %d image(s), %d step(s)", job_id, attempt, len(reqs), spec.steps)

    # --- stop ---------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Hand every job still held back to the queue front, then deregister."""
        for h in list(self.held.values()):
            try:
                if not h.ending:
                    self.scripts.requeue(keys=[keys.job(h.job_id), keys.leases(self.q),
                                               keys.rq_queue(self.q), keys.rq_started(self.q)],
                                         args=[h.job_id, h.attempt, self.q])
                    metrics.REQUEUED.labels(why="graceful_stop").inc()
                    log.info("job %s handed back to the queue", h.job_id)
            except REDIS_ERRORS:
                log.warning("could not requeue %s; its lease will expire and the reaper will", h.job_id)
        self.hb.stop()
        log.info("worker %s stopped", self.name)
