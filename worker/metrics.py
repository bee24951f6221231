"""Worker metrics (prometheus-client), names prefixed latentd_worker_. Labels never carry
prompts or keys: `key` is the API key's NAME (the job's owner), `reason` an error code, `model`
the name of the model this worker serves (a worker serves one: `bind()` sets it at start), on
every metric of the work itself (jobs, images, steps, batches, waits, failures, requeues)."""
from __future__ import annotations

import errno
import resource
import socket

from prometheus_client import Counter, Gauge, Histogram, start_http_server

class ForModel:
    """A metric with a `model` label whose value is this process's model: used as the plain
    metric would be (`.inc()`, `.observe()`, `.labels(status=...)`), the label filled in."""
    model = "-"                            # until bind(): a worker that has not started yet

    def __init__(self, metric):
        self.metric = metric

    def labels(self, **kw):
        return self.metric.labels(model=ForModel.model, **kw)

    def __getattr__(self, attr):
        return getattr(self.metric.labels(model=ForModel.model), attr)


def _m(kind, name: str, doc: str, labels=(), **kw) -> ForModel:
    return ForModel(kind(name, doc, ["model", *labels], **kw))


def bind(model: str) -> None:
    """This worker's model: the `model` label of every ForModel metric; series without other
    labels appear at once (at 0), so a scrape shows the model before its first job."""
    ForModel.model = model
    for m in (QUEUE_WAIT, RUN_TIME, STEP_TIME, BATCH_SIZE, RUNNING, WAITING, UNET_CALLS,
              UNET_PER_IMAGE, IMAGES, FLAGGED, MODEL_LOAD, PREVIEWS, PREEMPTIONS, PARKED_SECONDS,
              PARKED, LORA_LOADS, LORA_HITS, LORA_LOAD_SECONDS, LORA_CACHED_BYTES):
        m.labels()


_T = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

QUEUE_WAIT = _m(Histogram, "latentd_worker_queue_wait_seconds",
                       "Seconds from submit to first claim by a worker", buckets=_T)
QUEUE_WAIT_BY_PRIORITY = _m(Histogram, "latentd_worker_queue_wait_by_priority_seconds",
                            "Seconds from submit to first claim by a worker, by request priority",
                            ["priority"], buckets=_T)
PREEMPTIONS = _m(Counter, "latentd_worker_preemptions_total",
                 "Running images parked at a step boundary for higher-priority work (their state kept)")
PARKED_SECONDS = _m(Counter, "latentd_worker_parked_seconds_total",
                    "Seconds images spent parked before they ran on")
PARKED = _m(Gauge, "latentd_worker_parked_requests", "Images parked now (state kept, waiting to run on)")
RUN_TIME = _m(Histogram, "latentd_worker_run_seconds",
                     "Seconds from claim to the job's end (all its images)", buckets=_T)
STEP_TIME = _m(Histogram, "latentd_worker_step_seconds",
                      "Seconds per batched denoising iteration (one U-Net call)", buckets=_T)
BATCH_SIZE = _m(Histogram, "latentd_worker_batch_size", "Requests stepped by one U-Net call",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
RUNNING = _m(Gauge, "latentd_worker_running_requests", "Requests in the running batch set")
WAITING = _m(Gauge, "latentd_worker_waiting_requests", "Requests claimed, waiting for admission")
UNET_CALLS = _m(Counter, "latentd_worker_unet_calls_total", "Batched U-Net calls (iterations that stepped)")
UNET_PER_IMAGE = _m(Gauge, "latentd_worker_unet_calls_per_image",
                       "U-Net calls so far divided by images generated so far")
IMAGES = _m(Counter, "latentd_worker_images_generated_total", "Images generated and stored")
FLAGGED = _m(Counter, "latentd_worker_images_flagged_total", "Images flagged by the safety checker")
JOBS = _m(Counter, "latentd_worker_jobs_total", "Jobs ended by this worker", ["status"])
FAILURES = _m(Counter, "latentd_worker_failures_total", "Failed jobs by reason", ["reason"])
REQUEUED = _m(Counter, "latentd_worker_requeued_total",
                   "Jobs requeued by this worker's reaper (lease expired) or on graceful stop", ["why"])
MODEL_LOAD = _m(Gauge, "latentd_worker_model_load_seconds", "Seconds the model took to load")
DEVICE_MEMORY = Gauge("latentd_worker_device_memory_bytes",
                      "Device memory in use (CUDA allocated; on the CPU: peak process RSS)", ["device"])
COMPUTE = _m(Counter, "latentd_worker_compute_seconds_total",
                  "Compute seconds (each request's share of batched calls) per API key name", ["key"])
THREADS = Gauge("latentd_worker_threads",
                "Intra-op CPU threads the engine uses now (worker/cpu.py gives busy neighbours theirs)")
THROTTLED = Counter("latentd_worker_throttled_seconds_total",
                    "Seconds of engine iterations run on fewer threads than the usable cores, "
                    "because other processes kept cores busy")
REDIS_ERRORS = Counter("latentd_worker_redis_errors_total", "Redis connection errors survived")
STALLED = Gauge("latentd_worker_stalled",
                "1 while the main loop has made no progress for longer than its stall limit")
COMPILES = Counter("latentd_worker_compiles_total",
                   "torch.compile compilations of the U-Net step (one per batch bucket and latent size)")
COMPILE_SECONDS = Counter("latentd_worker_compile_seconds_total", "Seconds spent compiling the U-Net step")
LORA_LOADS = _m(Counter, "latentd_worker_lora_loads_total",
                "LoRA adapter files loaded (a name not in the adapter cache, or its file changed)")
LORA_HITS = _m(Counter, "latentd_worker_lora_cache_hits_total", "LoRA adapters found loaded in the cache")
LORA_LOAD_SECONDS = _m(Counter, "latentd_worker_lora_load_seconds_total", "Seconds spent loading LoRA adapters")
LORA_CACHED_BYTES = _m(Gauge, "latentd_worker_lora_cached_bytes",
                       "Bytes of LoRA adapters kept loaded (LATENTD_LORA_CACHE_MB bounds them)")
_lora_seen = {"loads": 0, "hits": 0, "load_seconds": 0.0}


def count_loras(library) -> None:
    """The adapter library's counters (model/lora_library.py) since the last call, as metrics."""
    for name, metric in (("loads", LORA_LOADS), ("hits", LORA_HITS), ("load_seconds", LORA_LOAD_SECONDS)):
        now = getattr(library, name)
        if now > _lora_seen[name]:
            metric.inc(now - _lora_seen[name])
        _lora_seen[name] = now
    LORA_CACHED_BYTES.set(library.cached_bytes)


REQUEST_MEMORY = Gauge("latentd_worker_request_memory_bytes",
                       "Measured device memory one request adds to a batched U-Net step (native size)")


PORT_SCAN = 64          # ports tried from the base: the first free one is taken


def serve(port: int, addr: str = "0.0.0.0") -> int | None:
    """Expose /metrics on the first free port from `port` upward (0: don't); returns the port.

    Several workers on one host (one per GPU) all start from the same base with default
    settings: binding is the test for "free", so two workers starting at once cannot both
    take the same port, and each one publishes the port it got (heartbeat, log)."""
    if not port:
        return None
    for p in range(port, min(port + PORT_SCAN, 65536)):
        try:
            start_http_server(p, addr=addr)
            return p
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"no free metrics port in {port}..{port + PORT_SCAN - 1} "
                                    "(LATENTD_WORKER_METRICS_PORT)")


def advertised_host(redis_url: str) -> str:
    """The address other machines can reach this worker at: the local address of the route to
    Redis (a connected UDP socket sends nothing), since whoever shares that Redis shares that
    network; the host name when Redis is a unix socket or the route cannot be found."""
    from latentd.config.redis_url import RedisUrlError, first_host

    try:
        target = first_host(redis_url)
    except RedisUrlError:
        target = None
    if target is not None:
        try:
            family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect(target)
                host = sock.getsockname()[0]
            return f"[{host}]" if ":" in host else host
        except OSError:
            pass
    return socket.gethostname()


def update_device_memory(device: str) -> None:
    try:
        if device.startswith("cuda"):
            import torch

            DEVICE_MEMORY.labels(device=device).set(torch.cuda.memory_allocated(device))
            return
    except Exception:  # noqa: BLE001 - metrics must never break the worker
        pass
    # ru_maxrss is KiB on Linux
    DEVICE_MEMORY.labels(device=device).set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
PREVIEWS = _m(Counter, "latentd_worker_previews_total", "Previews published to listening clients")
WEBHOOKS = Counter("latentd_worker_webhook_deliveries_total",
                   "Webhook delivery attempts by outcome (delivered, retry, gave_up, refused)",
                   ["outcome"])
WEBHOOK_PENDING = Gauge("latentd_worker_webhooks_pending", "Webhook deliveries waiting (all workers)")
RESUMED_STEPS = _m(Counter, "latentd_worker_resumed_steps_total",
                   "Denoising steps not run again because a requeued job resumed from saved row states")
CHECKPOINT_ROWS = _m(Counter, "latentd_worker_checkpoint_rows_total",
                     "Row states of running images saved to Redis (checkpoints for resume)")
CHECKPOINT_SECONDS = _m(Counter, "latentd_worker_checkpoint_seconds_total",
                        "Seconds spent serialising and saving row states")
CHECKPOINTS_IGNORED = _m(Counter, "latentd_worker_checkpoints_ignored_total",
                         "Saved row states not resumed: they do not match the job (reason)", ["reason"])
