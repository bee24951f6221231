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

The parts: worker/process.py loads the model and runs the process around the loop (signals,
metrics, webhooks, heartbeat); worker/ledger.py keeps the held jobs and what they owe Redis;
this module is the loop between them.
"""
from __future__ import annotations

import logging
import time

from latentd.jobs import keys
from latentd.worker import metrics
from latentd.worker.ledger import Ledger
from latentd.worker.process import Runtime, WorkerProcess
from latentd.worker.recovery import REDIS_ERRORS
from latentd.worker.supervisor import CANNOT_START

log = logging.getLogger("latentd.worker")


def rq_entry(*_args, **_kwargs):
    """The function name RQ records for our jobs. Only `latentd worker` runs them (batched, in
    process); a stock `rq worker` on this queue must not."""
    raise RuntimeError("latentd jobs are run by `latentd worker`, not by `rq worker`")


class Worker:
    """One worker process: load, loop until a stop signal, hand back what is left, exit."""

    def __init__(self, settings):
        self.process = WorkerProcess(settings)

    def run(self) -> int:
        p = self.process
        p.catch_signals()
        try:
            rt = p.load()
            ledger = Ledger(p.s, p.name, p.held, rt)
            p.announce(rt)
        except Exception as e:  # noqa: BLE001 - a worker that cannot load must say why and exit
            p.cannot_start(e)
            return CANNOT_START
        MainLoop(p, rt, ledger).run()
        ledger.hand_back()
        p.stop()
        return 0


class MainLoop:
    """Each tick: compute (one executor iteration into the ledger), then Redis (the ledger's
    writes, touches and claims), skipped with backoff while Redis is away."""

    def __init__(self, process: WorkerProcess, rt: Runtime, ledger: Ledger):
        self.process = process
        self.s = process.s
        self.rt = rt
        self.ledger = ledger
        self.unet_calls = 0
        self.last_touch = 0.0
        self.last_sweep = time.monotonic()

    @property
    def stopping(self) -> bool:
        """Read afresh each time: the signal may come in the middle of a phase."""
        return self.process.stopping

    def run(self) -> None:
        """Ticks until stopped and the held work is done (or the grace period is over)."""
        ledger = self.ledger
        backoff, grace_end, retry_at, down = 0.5, None, 0.0, False
        while True:
            self.rt.hb.last_progress = time.monotonic()
            if self.stopping:
                grace_end = grace_end or time.monotonic() + self.process.grace_s
                if not ledger.has_work() or time.monotonic() > grace_end:
                    break
            self.compute()
            if time.monotonic() < retry_at:        # Redis was down: keep computing, retry later
                if ledger.ex.idle:
                    time.sleep(min(0.1, retry_at - time.monotonic()))
                continue
            try:
                self.redis_phase()
                if down:
                    log.info("Redis is back; %d result(s) to write", len(ledger.outbox))
                backoff, down = 0.5, False
            except REDIS_ERRORS as e:
                metrics.REDIS_ERRORS.inc()
                if not down:
                    log.warning("Redis unavailable (%s); computing on, %d result(s) kept, "
                                "reconnecting with backoff", e, len(ledger.outbox))
                down, retry_at = True, time.monotonic() + backoff
                backoff = min(backoff * 2, 5.0)

    def compute(self) -> None:
        """One executor iteration; everything it yields goes to memory or the outbox."""
        ledger, governor = self.ledger, self.rt.governor
        for job_id in self.rt.hb.pop_lost():
            ledger.drop(job_id, "lost")
        ledger.check_timeouts()
        if ledger.ex.idle:
            return
        if governor is not None:
            governor.tick()
        t = time.perf_counter()
        try:
            evs = ledger.ex.iterate()
        except Exception as e:  # noqa: BLE001 - an engine bug must not take the worker down
            log.exception("executor iteration failed; failing its jobs")
            ledger.engine_failed(f"{type(e).__name__}: {e}"[:500])
            return
        dt = time.perf_counter() - t
        if governor is not None and governor.threads < governor.max:
            metrics.THROTTLED.inc(dt)
        stepped, finished = ledger.take(evs)
        if finished:
            metrics.UNET_PER_IMAGE.set(self.unet_calls / ledger.images)
        if stepped:
            self.unet_calls += 1
            metrics.UNET_CALLS.inc()
            metrics.STEP_TIME.observe(dt)
            metrics.BATCH_SIZE.observe(stepped)
        metrics.RUNNING.set(ledger.ex.running_count)
        metrics.WAITING.set(ledger.ex.waiting_count)
        metrics.PARKED.set(ledger.ex.parked_count)

    def redis_phase(self) -> None:
        ledger = self.ledger
        ledger.flush_live()        # first: a job's progress and previews come before its end
        ledger.flush()
        now = time.monotonic()
        if now - self.last_touch >= self.s.progress_interval_s:
            ledger.touch()
            self.last_touch = now
        if not self.stopping:
            ledger.claim_more()
        if ledger.ex.idle and not ledger.has_work() and not self.stopping:
            self.rt.hb.set_info(state="ready", running=0)
            # block briefly on the queue; the id moves into our inbox, then claim() takes it --
            # unless a stop signal came meanwhile (stopping, the inbox goes back to the queue)
            if self.rt.redis.blmove(keys.rq_queue(self.s.queue_name), keys.inbox(self.process.name),
                                    1.0, "LEFT", "RIGHT") and not self.stopping:
                ledger.claim_more()
        if now - self.last_sweep > 600:
            self.last_sweep = now
            self.rt.store.sweep()
