"""The worker's job ledger: what it holds, what it owes Redis, and the executor requests behind it.

Claimed jobs become executor requests (one per image still to make); the executor's events
become progress in memory, previews and progress for the event streams (`live`, lossy), and an
outbox of images and failures (kept across Redis outages, written in order by `flush`). Every
write that ends or records a job is fenced by its claim attempt (jobs/jobstore.py), so a job
that was requeued meanwhile is not touched.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from latentd.jobs import events, keys
from latentd.jobs.encode import encode_image
from latentd.jobs.errors import StoreError
from latentd.jobs.jobstore import Claim, ImageResult, Touch
from latentd.jobs.keys import PRIORITIES
from latentd.jobs.spec import JobSpec
from latentd.model.errors import InvalidRequest
from latentd.model.pipeline import GenerationRequest
from latentd.worker import metrics
from latentd.worker.adapters import load_loras
from latentd.worker.checkpoint import Checkpointer
from latentd.worker.executor import Failed, Finished, Parked, Preview, Progress, Resumed, Unparked
from latentd.worker.finishing import moderated, usage_share
from latentd.worker.held import Held, HeldJobs, parse_rid
from latentd.worker.recovery import REDIS_ERRORS

if TYPE_CHECKING:
    from latentd.worker.process import Runtime

log = logging.getLogger("latentd.worker")
MAX_LIVE = 1000            # unsent progress/preview events kept while Redis is unreachable


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
    compute_s: float = 0.0                 # spent on images it did not record (charged as it ends)


class Ledger:
    """The held jobs, their executor requests and the writes they owe Redis (outbox, live)."""

    def __init__(self, settings, name: str, held: HeldJobs, rt: Runtime):
        self.s = settings
        self.name = name
        self.held = held
        self.rt = rt
        self.ex = rt.new_executor()
        self.outbox: list[PendingImage | PendingFailure] = []
        self.live: list[tuple] = []            # (job id, type, data) for the event streams; lossy
        self.images = 0
        # row states saved every few steps so that a requeued job resumes (worker/checkpoint.py)
        self.ckpt = Checkpointer(rt.pipe, rt.model_name, settings.checkpoint_every_steps,
                                 settings.checkpoint_every_s)

    def has_work(self) -> bool:
        """Jobs held or results not yet written."""
        return bool(len(self.held) or self.outbox)

    # --- the executor's side ------------------------------------------------------------------
    def take(self, evs) -> tuple[int, int]:
        """Apply one iteration's events; (requests stepped, images finished)."""
        stepped = finished = 0
        for ev in evs:
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
                finished += 1
            elif isinstance(ev, Failed):
                self.fail(h, ev.code, ev.message)
            elif isinstance(ev, Resumed):
                self.resumed(h, k, ev)
            elif isinstance(ev, Parked):
                h.parked[k] = time.monotonic()
                h.dirty = True
                self.ckpt.urgent(ev.request_id)
                metrics.PREEMPTIONS.inc()
                log.info("job %s image %d parked at step %d of %d for higher-priority work",
                         job_id, k, ev.step, ev.total)
            elif isinstance(ev, Unparked):
                h.parked.pop(k, None)
                h.dirty = True
                metrics.PARKED_SECONDS.inc(ev.parked_s)
        if len(self.live) > MAX_LIVE:        # Redis has been away: keep only the newest
            del self.live[:-MAX_LIVE]
        return stepped, finished

    def engine_failed(self, message: str) -> None:
        """The executor raised: fail every held job and start over with a fresh executor."""
        for h in self.held.all():
            self.fail(h, "engine_error", message)
        self.ex = self.rt.new_executor()

    def finished(self, h: Held, k: int, ev) -> None:
        img = ev.image
        image = moderated(img.image, img.nsfw, h.spec)      # black when flagged (worker/finishing.py)
        encoded = encode_image(image, h.spec.params(), img.seed, self.rt.model_name,
                               h.spec.output_format, h.spec.output_compression)
        meta = {"index": k, "seed": img.seed, "nsfw": bool(img.nsfw), "width": image.width,
                "height": image.height, "warnings": list(img.warnings or []),
                "timings": {a: round(float(b), 4) for a, b in (img.timings or {}).items()},
                "usage": {**usage_share(self.rt.pipe, h.spec, image),
                          "compute_seconds": round(float(ev.compute_s), 6)}}
        h.todo.discard(k)
        h.progress[k] = h.spec.run_steps
        self.ckpt.forget(h, k)
        self.outbox.append(PendingImage(h.job_id, h.attempt, k, encoded, json.dumps(meta), ev.compute_s))
        self.images += 1
        metrics.IMAGES.inc()
        if img.nsfw:
            metrics.FLAGGED.inc()
        metrics.COMPUTE.labels(key=h.spec.owner).inc(ev.compute_s)

    def resumed(self, h: Held, k: int, ev: Resumed) -> None:
        """Image k went on from its saved row at ev.step: progress, the job's resumed_from_step
        (written with the next touch) and the steps it did not run again."""
        h.progress[k] = ev.step
        h.resumed_from = (h.resumed_from or h.base_steps) + ev.step
        h.dirty = True
        self.ckpt.resumed(ev.request_id, ev.step, time.monotonic())
        metrics.RESUMED_STEPS.inc(ev.step)
        log.info("job %s image %d resumed at step %d of %d", h.job_id, k, ev.step, ev.total)

    def previewed(self, h: Held, k: int, ev) -> None:
        """A coarse preview (a PNG of a few cells, model/preview.py) for the job's listeners."""
        if h.watch is None:
            return
        buf = io.BytesIO()
        Image.fromarray(ev.rgb).save(buf, format="PNG")
        info = self.rt.pipe.info
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
        spent = sum(self.ex.compute_of(h.rid(k)) for k in h.todo)   # its unfinished images' share
        for k in h.todo:
            self.ex.cancel(h.rid(k))
        self.outbox.append(PendingFailure(h.job_id, h.attempt, code, message, spent))
        metrics.FAILURES.labels(reason=code).inc()
        log.warning("job %s failed: %s: %s", h.job_id, code, message)

    def check_timeouts(self) -> None:
        """Called before every step: a job past its timeout or its deadline (deadline_s after
        admission) stops here, within one step."""
        now, wall = time.monotonic(), time.time()
        for h in self.held.all():
            if not h.ending and h.todo and now > h.deadline:    # (all done: only writes left)
                limit = h.spec.timeout_s or self.s.job_timeout_s
                self.fail(h, "timeout", f"the job ran longer than its timeout of {limit:g}s")
            elif not h.ending and h.todo and h.due_at is not None and wall > h.due_at:
                self.fail(h, "deadline_exceeded", f"the job was still running at its deadline "
                                                  f"({h.spec.deadline_s}s after admission); stopped")

    def drop(self, job_id: str, why: str) -> None:
        """Forget a job that is no longer ours (canceled, requeued elsewhere, or ended)."""
        h = self.held.pop(job_id)
        if h is None:
            return
        for k in h.todo:
            self.ex.cancel(h.rid(k))
        self.ckpt.forget(h)
        if why != "ended":
            log.info("job %s dropped (%s)", job_id, why)

    def ended(self, job_id: str, status: str) -> None:
        h = self.held.get(job_id)
        if h is not None:
            metrics.JOBS.labels(status=status).inc()
            metrics.RUN_TIME.observe(time.time() - h.claimed_at)
        self.drop(job_id, "ended")

    # --- writes to Redis ----------------------------------------------------------------------
    def flush(self) -> None:
        """Write pending results in order; a Redis error leaves the rest for the next tick."""
        jobs, store = self.rt.jobs, self.rt.store
        while self.outbox:
            item = self.outbox[0]
            if isinstance(item, PendingImage):
                try:
                    store.put(item.job_id, item.k, item.data, jobs.ttl)
                except StoreError as e:
                    # the image cannot be kept: fail its job (once, clearly) and go on
                    self.outbox = [x for x in self.outbox     # its other images: same fate
                                   if not (isinstance(x, PendingImage) and x.job_id == item.job_id
                                           and x.attempt == item.attempt)]
                    h = self.held.get(item.job_id)
                    if h is not None and h.attempt == item.attempt:
                        self.fail(h, "storage_error", f"could not store image {item.k}: {e}"[:500])
                    continue
                res = jobs.record_image(item.job_id, item.attempt, item.k, item.meta_json,
                                        item.compute_s, self.held_steps(item.job_id))
                if res is ImageResult.SUCCEEDED:
                    self.ended(item.job_id, "succeeded")
                elif res is ImageResult.NOT_OURS:
                    self.drop(item.job_id, "not ours any more")
            else:
                jobs.finish(item.job_id, "failed", {"code": item.code, "message": item.message},
                            attempt=item.attempt, compute_s=item.compute_s)
                self.ended(item.job_id, "failed")
            self.outbox.pop(0)
        self.save_rows()

    def save_rows(self, force: bool = False) -> None:
        """Save the row states that are due (worker/checkpoint.py): one fenced script per job, all
        in one round trip; a job whose save is refused is no longer ours. force: every row that
        moved since its last save (a graceful stop, before handing the jobs back)."""
        t0, now = time.perf_counter(), time.monotonic()
        due = self.ckpt.due(self.held.all(), self.ex, now, force)
        if not due:
            return
        pipe = self.rt.redis.pipeline(transaction=False)
        for h, rows, _ in due:
            self.rt.jobs.save_rows_on(pipe, h.job_id, h.attempt, rows)
        for (h, _, steps), res in zip(due, pipe.execute()):
            if int(res) < 0:
                self.drop(h.job_id, "not ours any more")
                continue
            self.ckpt.saved(h, steps, now)
            metrics.CHECKPOINT_ROWS.inc(int(res))
        metrics.CHECKPOINT_SECONDS.inc(time.perf_counter() - t0)

    def held_steps(self, job_id: str) -> int:
        h = self.held.get(job_id)
        return h.spec.run_steps if h else 0

    def flush_live(self) -> None:
        """Write progress and previews to the event streams of watched jobs (one round trip).
        Lossy by design: on a Redis error they are dropped, the next ones follow."""
        if not self.live:
            return
        items, self.live = self.live, []
        pipe = self.rt.redis.pipeline(transaction=False)
        for job_id, type_, data in items:
            events.add(pipe, job_id, type_, data, int(self.s.result_ttl_s))
        pipe.execute()

    def touch(self) -> None:
        """Progress of every held job + lease refresh, one Lua call; drop jobs no longer ours
        (canceled by the owner, or requeued after our lease lapsed)."""
        if not len(self.held):
            return
        entries = []
        for h in self.held.all():
            fields = {f"p:{k}": v for k, v in h.progress.items()} if h.dirty else {}
            if fields and h.resumed_from is not None:
                fields["resumed_from_step"] = h.resumed_from
            if h.dirty:
                fields["parked"] = 1 if h.parked else 0
            entries.append(Touch(h.job_id, h.attempt, fields))
            h.dirty = False
        now = time.time()
        hb = self.rt.hb
        for j in self.rt.jobs.touch(self.name, self.s.lease_s, 3 * hb.interval, entries, now=now):
            self.drop(j, "canceled or requeued")
        ids = self.held.ids()
        self.apply_watch(events.watched(self.rt.redis, ids), ids)
        self.publish_progress(now)
        hb.set_info(state="busy", running=self.ex.running_count)

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
        for h in self.held.all():
            if h.watch is None or h.ending:
                continue
            done = h.steps_done()
            if done == h.sent_step:
                continue
            h.sent_step = done
            total = h.spec.run_steps * h.spec.n
            rate = (done - (h.resumed_from or h.base_steps)) / max(now - h.claimed_at, 1e-6)
            eta = round((total - done) / rate, 2) if rate > 0 else None
            self.live.append((h.job_id, "running", {"step": done, "total": total, "eta_s": eta}))

    def hand_back(self) -> None:
        """On stop: every job still held goes back to the queue front for another worker, its
        running rows saved first so that it resumes where it stopped."""
        try:
            self.save_rows(force=True)
        except REDIS_ERRORS:
            log.warning("could not save row states on stop; held jobs resume from their last save")
        for h in self.held.all():
            try:
                if not h.ending:
                    self.rt.jobs.requeue(h.job_id, h.attempt)
                    metrics.REQUEUED.labels(why="graceful_stop").inc()
                    log.info("job %s handed back to the queue", h.job_id)
            except REDIS_ERRORS:
                log.warning("could not requeue %s; its lease will expire and the reaper will", h.job_id)

    # --- claims -------------------------------------------------------------------------------
    def room(self) -> int:
        return self.s.worker_max_batch - (self.ex.running_count + self.ex.waiting_count)

    def claim_more(self) -> None:
        while self.room() > 0:
            now = time.time()
            got = self.rt.jobs.claim(self.name, self.s.lease_s, now=now)
            if got is None:
                return
            self.start_job(got, now)
        # Full: a job that outranks the running work is still taken (one at a time), so that the
        # executor parks lower-priority rows for it at the next step instead of it waiting in
        # the queue for them to finish.
        while (limit := self.ex.claim_limit()) is not None:
            now = time.time()
            got = self.rt.jobs.claim(self.name, self.s.lease_s, now=now, lowest=PRIORITIES[limit])
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
        self.held.add(h)
        if spec is None:
            self.fail(h, *err)
            return
        redis, model_name = self.rt.redis, self.rt.model_name
        created = redis.hget(keys.job(job_id), "created_at")
        h.priority = PRIORITIES.index(spec.priority)
        if attempt == 1 and created:
            metrics.QUEUE_WAIT.observe(max(0.0, now - float(created)))
            metrics.QUEUE_WAIT_BY_PRIORITY.labels(priority=spec.priority).observe(
                max(0.0, now - float(created)))
        if spec.deadline_s is not None and created:
            h.due_at = float(created) + spec.deadline_s
            if now >= h.due_at:              # not started in time: fail it before any step runs
                self.fail(h, "deadline_exceeded", f"no worker started the job within its deadline "
                          f"({spec.deadline_s}s after admission; it waited {now - float(created):.1f}s)")
                return
        if spec.model not in (None, "", model_name):
            self.fail(h, "invalid_request", f"model: {spec.model!r} is not served by this "
                                            f"worker (it serves {model_name!r})")
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
            spec = spec.check(self.rt.pipe.info)      # validated against this model (jobs/spec.py)
            loras = load_loras(self.rt.loras, spec.loras)
            for k in range(spec.n):
                if k not in done:
                    reqs[k] = GenerationRequest(**spec.image_request_kwargs(k), **edit, loras=loras)
        except InvalidRequest as e:
            self.fail(h, "invalid_request", str(e))
            return
        h.todo = set(reqs)
        h.progress = {k: 0 for k in reqs}
        h.base_steps = spec.run_steps * (spec.n - len(reqs))
        if attempt > 1:
            h.resumed_from = h.base_steps            # + the steps of rows resumed (Resumed events)
            h.dirty = True
        rows = self.ckpt.usable(job_id, attempt, c.spec_json, self.rt.jobs.checkpoints(job_id), reqs)
        for k, req in reqs.items():
            self.ex.add(h.rid(k), spec.owner, req, resume=rows.get(k), priority=h.priority)
        pipe = redis.pipeline(transaction=False)
        events.add(pipe, job_id, "running", {"attempt": attempt, "step": h.base_steps,
                                             "total": spec.run_steps * spec.n, "eta_s": None},
                   int(self.s.result_ttl_s))
        pipe.execute()
        self.apply_watch(events.watched(redis, [job_id]), [job_id])
        log.info("job %s attempt %d: %d image(s), %d step(s)", job_id, attempt, len(reqs), spec.steps)

    def init_images(self, job_id: str, spec: JobSpec) -> dict | None:
        """{"init_image": PIL, "mask": PIL | None} of an edit, from its stored PNGs (decoded
        once for all n images); None when they are gone."""
        image, mask = self.rt.redis.hmget(keys.init_image(job_id), "image", "mask")
        if image is None or (spec.kind == "inpaint" and mask is None):
            return None
        try:
            out = {"init_image": Image.open(io.BytesIO(image)).convert("RGB"), "mask": None}
            if spec.kind == "inpaint":
                out["mask"] = Image.open(io.BytesIO(mask)).convert("L")
        except (OSError, ValueError):
            return None
        return out
