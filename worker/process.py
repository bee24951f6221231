"""The worker process around the main loop: loading, announcing, signals and stopping.

`load()` connects to Redis and the image store, starts the heartbeat (the worker is visible as
"loading" at once, then "warming" while the model compiles and warms up) and loads the model
once; it returns a `Runtime`, which exists only for a loaded worker. `announce()` then serves
/metrics, starts the webhook threads and publishes the worker as "ready" (what /readyz waits
for). A stop signal only sets `stopping`: the loop finishes held work for up to `grace_s`.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from latentd.jobs.jobstore import JobStore
from latentd.jobs.models import served
from latentd.jobs.store import Store, make_store
from latentd.worker.webhook_delivery import Deliverer
from latentd.model.lora_library import LoraLibrary
from latentd.model.pipeline import load_pipeline
from latentd.worker.finishing import judged
from latentd.model.precision import default_dtype
from latentd.model.preview import fit_for
from latentd.worker import metrics
from latentd.worker.cpu import ThreadGovernor
from latentd.worker.executor import BatchExecutor
from latentd.worker.held import HeldJobs
from latentd.worker.prepare import prepare
from latentd.worker.recovery import Heartbeat, connect

log = logging.getLogger("latentd.worker")


def resolve_device(settings) -> tuple[str, object]:
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if settings.dtype == "auto":
        dtype = default_dtype(device)
    else:
        dtype = getattr(torch, settings.dtype)
    return device, dtype


@dataclass(frozen=True)
class Runtime:
    """A loaded worker: its connections, heartbeat and model, and how to make an executor."""
    redis: object
    jobs: JobStore
    store: Store
    hb: Heartbeat
    pipe: object                           # model.pipeline's loaded pipeline
    info: object                           # its ModelInfo, named as the deployment names it
    device: str
    new_executor: Callable[[], BatchExecutor]
    governor: ThreadGovernor | None        # on the CPU: yields cores to other processes
    load_started: float                    # perf_counter() when loading began
    loras: object                          # model.lora_library.LoraLibrary of the model's adapters

    @property
    def model_name(self) -> str:
        return self.info.name


class WorkerProcess:
    def __init__(self, settings):
        # the one model this process serves (jobs/models.py): its queue is the worker's queue
        # for everything (claims, leases, heartbeat, reaper, inbox), its folder the one loaded
        self.model = served(settings)
        settings = settings.model_copy(update={"queue_name": self.model.queue,
                                               "model": self.model.source})
        metrics.bind(self.model.name)
        self.s = settings
        self.name = (settings.worker_name or f"{socket.gethostname()}-{os.getpid()}").replace(":", "_")
        self.grace_s = settings.worker_grace_s
        # a main loop without progress for this long stops being vouched for (leases lapse)
        self.stall_s = settings.job_timeout_s + 2 * settings.lease_s + 60
        self.stopping = False
        self.held = HeldJobs()                 # the heartbeat renews these jobs' leases
        self.hb: Heartbeat | None = None       # started by load()
        self.webhooks: Deliverer | None = None  # started by announce()

    def catch_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, _frame):
        log.info("signal %d: stopping (finishing held work for up to %.0fs)", signum, self.grace_s)
        self.stopping = True

    def load(self) -> Runtime:
        s = self.s
        redis = connect(s.redis_url)
        jobs = JobStore(redis, s.queue_name, s.result_ttl_s)
        store = make_store(redis, s)
        store.prepare()
        self.hb = hb = Heartbeat(s, self.name, self.held.snapshot, self.stall_s)
        hb.start()                                       # visible as "loading" at once
        device, dtype = resolve_device(s)
        t = time.perf_counter()
        pipe = load_pipeline(s.model, device=device, dtype=dtype, safety=s.safety)
        judged(pipe)                        # flags only: the ledger redacts per job's moderation
        metrics.MODEL_LOAD.set(time.perf_counter() - t)
        preview = self.fit_preview(pipe)
        hb.set_info(state="warming")                     # still not ready: /readyz waits for this
        budget_mb, estimate = prepare(pipe, s)           # compile + warm-up, measured memory

        def new_executor() -> BatchExecutor:
            return BatchExecutor(pipe, max_batch=s.worker_max_batch, memory_budget_mb=budget_mb,
                                 memory_estimate=estimate, preview=preview,
                                 priority_alone=s.worker_priority_alone)

        governor = None
        if device == "cpu":                      # share the cores with whatever else runs here
            governor = ThreadGovernor(torch.get_num_threads(), self.set_threads)
        metrics.THREADS.set(torch.get_num_threads())
        info = replace(pipe.info, name=self.model.name)
        loras = LoraLibrary(pipe, s.model if os.path.isdir(s.model) else None, s.lora_dir or "",
                            s.lora_cache_mb)
        return Runtime(redis, jobs, store, hb, pipe, info, device, new_executor, governor, t, loras)

    def announce(self, rt: Runtime) -> None:
        """Serve /metrics, start the webhook threads, and publish the worker as ready."""
        s = self.s
        metrics_port = metrics.serve(s.worker_metrics_port)
        metrics.STALLED.set_function(
            lambda: float(time.monotonic() - rt.hb.last_progress > self.stall_s))
        self.webhooks = Deliverer(s, self.name)
        self.webhooks.start()
        metrics.update_device_memory(rt.device)
        where = {}
        if metrics_port:
            # published so that ops (and `latentd workers`) can find every worker's /metrics
            host = metrics.advertised_host(s.redis_url)
            where = {"metrics_port": metrics_port,
                     "metrics_url": f"http://{host}:{metrics_port}/metrics"}
            log.info("worker %s metrics on %s", self.name, where["metrics_url"])
        rt.hb.set_info(state="ready", model=json.dumps(rt.info.to_dict()), queue=s.queue_name,
                       device=rt.device, max_batch=s.worker_max_batch, **where)
        log.info("worker %s ready: model %s on %s in %.1fs", self.name, rt.model_name,
                 rt.device, time.perf_counter() - rt.load_started)

    def set_threads(self, n: int) -> None:
        """The governor's decision: other processes keep cores busy (or let them go)."""
        log.info("engine threads %d -> %d (cores busy with other processes)", torch.get_num_threads(), n)
        torch.set_num_threads(n)
        metrics.THREADS.set(n)

    @staticmethod
    def fit_preview(pipe):
        """The latent -> RGB map of model/preview.py, fitted once per load; previews are off (and
        the worker still serves) if the VAE cannot be used for the fit."""
        t = time.perf_counter()
        try:
            m = fit_for(pipe)
        except Exception as e:  # noqa: BLE001 - previews are optional, images are not
            log.warning("previews off: fitting the latent->RGB map failed: %s: %s", type(e).__name__, e)
            return None
        log.info("preview map fitted in %.2fs", time.perf_counter() - t)
        return m

    def cannot_start(self, e: Exception) -> None:
        log.error("worker %s cannot start: %s: %s", self.name, type(e).__name__, e)
        if self.hb is not None:
            self.hb.stop()

    def stop(self) -> None:
        """Deregister (the heartbeat's last act) and stop the webhook threads."""
        if self.hb is not None:
            self.hb.stop()
        if self.webhooks is not None:
            self.webhooks.stop()
        log.info("worker %s stopped", self.name)
