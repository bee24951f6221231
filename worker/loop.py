"""`latentd worker`: the long-lived worker process.

Loads the pipeline ONCE, never forks. The main loop pulls jobs straight off RQ's queue with our
own atomic claim (RQ has no batch dequeue, and its worker forks per job), expands a job of n
images into n requests with seeds S+k, and drives the BatchExecutor: each `iterate()` is one
batched U-Net step over every running request. Around it, in this order each tick:

  compute  -> events into memory (progress) and an outbox (images, failures); job timeouts.
  Redis    -> flush the outbox (fenced writes through jobs/jobstore.py), progress + cancel check
              (throttled, one Lua call for all held jobs), claim more work while the executor
              has room, or block briefly on the queue when idle.

Redis errors only pause the Redis half: computing goes on, the outbox is kept and flushed when
Redis is back (AOF keeps what was admitted). Leases, worker heartbeat and the reaper run on a
separate thread (worker/recovery.py). SIGTERM: stop claiming, finish held work for up to
`grace_s`, hand the rest back to the queue front.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from latentd.worker.cpu import ThreadGovernor
from latentd.model.errors import InvalidRequest
from latentd.model.pipeline import GenerationRequest, load_pipeline
from latentd.model.precision import default_dtype
from latentd.model.preview import fit_for
from latentd.jobs import events, keys
from latentd.worker import metrics
from latentd.worker.executor import BatchExecutor, Failed, Finished, Preview, Progress
from latentd.jobs.jobstore import Claim, ImageResult, JobStore, Touch
from latentd.jobs.encode import encode_image
from latentd.worker.prepare import prepare
from latentd.worker.recovery import REDIS_ERRORS, Heartbeat, connect
from latentd.jobs.spec import JobSpec
from latentd.jobs.errors import StoreError
from latentd.jobs.store import make_store
from latentd.jobs.webhooks import Deliverer

log = logging.getLogger("latentd.worker")
MAX_LIVE = 1000            # unsent progress/preview events kept while Redis is unreachable


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
    watch: int | None = None               # someone listens: preview every k steps (0: none)
    base_steps: int = 0                    # steps of images done by an earlier attempt
    sent_step: int = -1                    # progress last published to the event stream

    def steps_done(self) -> int:
        return self.base_steps + sum(min(p, self.spec.run_steps) for p in self.progress.values())

    def rid(self, k: int) -> str:
        return f"{self.job_id}.{k}.{self.attempt}"


@dataclass(frozen=True)
class PendingImage:
    """Outbox: an image to store and record (fenced by attempt)."""
    job_id: str
    attempt: int
    k: int
    data: bytes                            # the encoded file (PNG, JPEG or WebP)
    meta_json: str
    compute_s: float


@dataclass(frozen=True)
class PendingFailure:
    """Outbox: a job to end as failed (fenced by attempt)."""
    job_id: str
    attempt: int
    code: str
    message: str


def parse_rid(rid: str) -> tuple[str, int, int]:
    job_id, k, attempt = rid.split(".")
    return job_id, int(k), int(attempt)


def resolve_device(settings) -> tuple[str, object]:
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if settings.dtype == "auto":
        dtype = default_dtype(device)
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
        self.outbox: list[PendingImage | PendingFailure] = []
        self.live: list[tuple] = []            # (job id, type, data) for the event streams; lossy
        self.preview = None                    # model.preview.LatentRGB once the model is loaded
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
        s = self.s
        self.redis = connect(s.redis_url)
        self.jobs = JobStore(self.redis, s.queue_name, s.result_ttl_s)
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
        self.preview = self.fit_preview()
        self.hb.set_info(state="warming")                # still not ready: /readyz waits for this
        budget_mb, estimate = prepare(self.pipe, s)      # compile + warm-up, measured memory
        self.new_executor = lambda: BatchExecutor(self.pipe, max_batch=s.worker_max_batch,
                                                  memory_budget_mb=budget_mb, memory_estimate=estimate,
                                                  preview=self.preview)
        self.ex = self.new_executor()
        self.governor = None
        if self.device == "cpu":                 # share the cores with whatever else runs here
            self.governor = ThreadGovernor(torch.get_num_threads(), self.set_threads)
        metrics.THREADS.set(torch.get_num_threads())
        self.metrics_port = metrics.serve(s.worker_metrics_port)
        metrics.STALLED.set_function(lambda: float(time.monotonic() - self.hb.last_progress > stall_s))
        self.webhooks = Deliverer(s, self.name)
        self.webhooks.start()
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

    def set_threads(self, n: int) -> None:
        """The governor's decision: other processes keep cores busy (or let them go)."""
        log.info("engine threads %d -> %d (cores busy with other processes)", torch.get_num_threads(), n)
        torch.set_num_threads(n)
        metrics.THREADS.set(n)

    def fit_preview(self):
        """The latent -> RGB map of model/preview.py, fitted once per load; previews are off (and
        the worker still serves) if the VAE cannot be used for the fit."""
        t = time.perf_counter()
        try:
            m = fit_for(self.pipe)
        except Exception as e:  # noqa: BLE001 - previews are optional, images are not
            log.warning("previews off: fitting the latent->RGB map failed: %s: %s", type(e).__name__, e)
            return None
        log.info("preview map fitted in %.2fs", time.perf_counter() - t)
        return m

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
        if self.governor is not None and self.governor.threads < self.governor.max:
            metrics.THROTTLED.inc(dt)
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
            elif isinstance(ev, Preview):
                self.previewed(h, k, ev)
            elif isinstance(ev, Finished):
                self.finished(h, k, ev)
            elif isinstance(ev, Failed):
                self.fail(h, ev.code, ev.message)
        if len(self.live) > MAX_LIVE:        # Redis has been away: keep only the newest
            del self.live[:-MAX_LIVE]
        if stepped:
            self.unet_calls += 1
            metrics.UNET_CALLS.inc()
            metrics.STEP_TIME.observe(dt)
            metrics.BATCH_SIZE.observe(stepped)
        metrics.RUNNING.set(self.ex.running_count)
        metrics.WAITING.set(self.ex.waiting_count)

    def finished(self, h: Held, k: int, ev) -> None:
        img = ev.image
        png = encode_image(img.image, h.spec.params(), img.seed, self.model_name,
                           h.spec.output_format, h.spec.output_compression)
        meta = {"index": k, "seed": img.seed, "nsfw": bool(img.nsfw), "width": img.image.width,
                "height": img.image.height, "warnings": list(img.warnings or []),
                "timings": {a: round(float(b), 4) for a, b in (img.timings or {}).items()}}
        h.todo.discard(k)
        h.progress[k] = h.spec.run_steps
        self.outbox.append(PendingImage(h.job_id, h.attempt, k, png, json.dumps(meta), ev.compute_s))
        self.images += 1
        metrics.IMAGES.inc()
        if img.nsfw:
            metrics.FLAGGED.inc()
        metrics.COMPUTE.labels(key=h.spec.owner).inc(ev.compute_s)
        if self.images:
            metrics.UNET_PER_IMAGE.set(self.unet_calls / self.images)

    def previewed(self, h: Held, k: int, ev) -> None:
        """A coarse preview (a PNG of a few cells, model/preview.py) for the job's listeners."""
        if h.watch is None:
            return
        buf = io.BytesIO()
        Image.fromarray(ev.rgb).save(buf, format="PNG")
        info = self.pipe.info
        self.live.append((h.job_id, "preview", {
            "index": k, "step": ev.step, "total": ev.total,
            "width": h.spec.width or info.native_width, "height": h.spec.height or info.native_height,
            "png": base64.b64encode(buf.getvalue()).decode()}))
        metrics.PREVIEWS.inc()

    def fail(self, h: Held, code: str, message: str) -> None:
        """End the job as failed (once): its other requests leave the batch at once."""
        if h.ending:
            return
        h.ending = True
        for k in h.todo:
            self.ex.cancel(h.rid(k))
        self.outbox.append(PendingFailure(h.job_id, h.attempt, code, message))
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
        self.flush_live()          # first: a job's progress and previews come before its end
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
        while self.outbox:
            item = self.outbox[0]
            if isinstance(item, PendingImage):
                try:
                    self.store.put(item.job_id, item.k, item.data, self.jobs.ttl)
                except StoreError as e:
                    # the image cannot be kept: fail its job (once, clearly) and go on
                    self.outbox = [x for x in self.outbox     # its other images: same fate
                                   if not (isinstance(x, PendingImage) and x.job_id == item.job_id
                                           and x.attempt == item.attempt)]
                    h = self.held.get(item.job_id)
                    if h is not None and h.attempt == item.attempt:
                        self.fail(h, "storage_error", f"could not store image {item.k}: {e}"[:500])
                    continue
                res = self.jobs.record_image(item.job_id, item.attempt, item.k, item.meta_json,
                                             item.compute_s, self.held_steps(item.job_id))
                if res is ImageResult.SUCCEEDED:
                    self.ended(item.job_id, "succeeded")
                elif res is ImageResult.NOT_OURS:
                    self.drop(item.job_id, "not ours any more")
            else:
                self.jobs.finish(item.job_id, "failed", {"code": item.code, "message": item.message},
                                 attempt=item.attempt)
                self.ended(item.job_id, "failed")
            self.outbox.pop(0)

    def flush_live(self) -> None:
        """Write progress and previews to the event streams of watched jobs (one round trip).
        Lossy by design: on a Redis error they are dropped, the next ones follow."""
        if not self.live:
            return
        items, self.live = self.live, []
        pipe = self.redis.pipeline(transaction=False)
        for job_id, type_, data in items:
            events.add(pipe, job_id, type_, data, int(self.s.result_ttl_s))
        pipe.execute()

    def apply_watch(self, watched: dict[str, int], job_ids) -> None:
        """Tell the executor which requests to preview, from the listeners registered in Redis."""
        for job_id in job_ids:
            h = self.held.get(job_id)
            if h is None:
                continue
            every = watched.get(job_id)
            if every == h.watch:
                continue
            h.watch = every
            for k in h.todo:
                self.ex.watch(h.rid(k), every or 0)

    def publish_progress(self, now: float) -> None:
        """A progress event, with an estimate of the seconds left, for each watched job that
        advanced since its last one."""
        for h in self.held.values():
            if h.watch is None or h.ending:
                continue
            done = h.steps_done()
            if done == h.sent_step:
                continue
            h.sent_step = done
            total = h.spec.run_steps * h.spec.n
            rate = (done - h.base_steps) / max(now - h.claimed_at, 1e-6)
            eta = round((total - done) / rate, 2) if rate > 0 else None
            self.live.append((h.job_id, "running", {"step": done, "total": total, "eta_s": eta}))

    def held_steps(self, job_id: str) -> int:
        h = self.held.get(job_id)
        return h.spec.run_steps if h else 0

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
            entries.append(Touch(h.job_id, h.attempt,
                                 {f"p:{k}": v for k, v in h.progress.items()} if h.dirty else {}))
            h.dirty = False
        now = time.time()
        for j in self.jobs.touch(self.name, self.s.lease_s, 3 * self.hb.interval, entries, now=now):
            self.drop(j, "canceled or requeued")
        ids = list(self.held)
        self.apply_watch(events.watched(self.redis, ids), ids)
        self.publish_progress(now)
        self.hb.set_info(state="busy", running=self.ex.running_count)

    def room(self) -> int:
        return self.s.worker_max_batch - (self.ex.running_count + self.ex.waiting_count)

    def claim_more(self) -> None:
        while self.room() > 0:
            now = time.time()
            got = self.jobs.claim(self.name, self.s.lease_s, now=now)
            if got is None:
                return
            self.start_job(got, now)

    def start_job(self, c: Claim, now: float) -> None:
        job_id, attempt, done = c.job_id, c.attempt, c.done
        try:
            spec = JobSpec.from_json(c.spec_json)
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
        edit = {}
        if spec.kind != "text":
            edit = self.init_images(job_id, spec)
            if edit is None:
                self.fail(h, "invalid_request", "image: the job's init image is no longer stored or "
                                                "unreadable (it expired before a worker took the job?)")
                return
        reqs = {}
        try:
            spec.check(self.pipe.info)      # model.request.resolve, as the API ran it
            for k in range(spec.n):
                if k not in done:
                    reqs[k] = GenerationRequest(**spec.image_request_kwargs(k), **edit)
        except InvalidRequest as e:
            self.fail(h, "invalid_request", str(e))
            return
        h.todo = set(reqs)
        h.progress = {k: 0 for k in reqs}
        h.base_steps = spec.run_steps * (spec.n - len(reqs))
        for k, req in reqs.items():
            self.ex.add(h.rid(k), spec.owner, req)
        pipe = self.redis.pipeline(transaction=False)
        events.add(pipe, job_id, "running", {"attempt": attempt, "step": h.base_steps,
                                             "total": spec.run_steps * spec.n, "eta_s": None},
                   int(self.s.result_ttl_s))
        pipe.execute()
        self.apply_watch(events.watched(self.redis, [job_id]), [job_id])
        log.info("job %s attempt %d: %d image(s), %d step(s)", job_id, attempt, len(reqs), spec.steps)

    def init_images(self, job_id: str, spec: JobSpec) -> dict | None:
        """{"init_image": PIL, "mask": PIL | None} of an edit, from its stored PNGs (decoded
        once for all n images); None when they are gone."""
        image, mask = self.redis.hmget(keys.init_image(job_id), "image", "mask")
        if image is None or (spec.kind == "inpaint" and mask is None):
            return None
        try:
            out = {"init_image": Image.open(io.BytesIO(image)).convert("RGB"), "mask": None}
            if spec.kind == "inpaint":
                out["mask"] = Image.open(io.BytesIO(mask)).convert("L")
        except (OSError, ValueError):
            return None
        return out

    # --- stop ---------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Hand every job still held back to the queue front, then deregister."""
        for h in list(self.held.values()):
            try:
                if not h.ending:
                    self.jobs.requeue(h.job_id, h.attempt)
                    metrics.REQUEUED.labels(why="graceful_stop").inc()
                    log.info("job %s handed back to the queue", h.job_id)
            except REDIS_ERRORS:
                log.warning("could not requeue %s; its lease will expire and the reaper will", h.job_id)
        self.hb.stop()
        if getattr(self, "webhooks", None) is not None:
            self.webhooks.stop()
        log.info("worker %s stopped", self.name)
