"""All settings, from the environment with the LATENTD_ prefix (pydantic-settings).

One class for every process (API, worker, CLI) so a deployment documents one table.
`get_settings()` is cached; tests change the environment and call `get_settings.cache_clear()`.
"""
from __future__ import annotations

from functools import lru_cache

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATENTD_", extra="ignore")

    # --- shared -----------------------------------------------------------------------------
    env: str = "prod"                      # "dev" relaxes the refuse-insecure-defaults checks
    redis_url: str = "redis://127.0.0.1:6379/0"  # or redis+sentinel://h1:26379,h2:26379/mymaster/0
    redis_min_replicas: int = 0            # >0: admission WAITs for this many replicas to hold the job
    redis_wait_ms: int = 500               # ... for at most this long, else 503 (job canceled)
    model: str | None = None               # model folder / single file / hub id; None = bundled
    models: str = ""                       # "name=path,name2=path2" (or "path": name = its folder's
                                           # name); the first is the default; "" = `model` alone
    queue_name: str = "latentd"
    log_level: str = "info"
    lora_dir: str | None = None            # LoRA adapters (*.safetensors, by name) for every model,
                                           # searched before a model folder's own loras/

    # --- API (app/) ----------------------------------------
    host: str = "127.0.0.1"                # `latentd serve` / `latentd dev` bind address
    port: int = 8000
    api_workers: int = 1                   # uvicorn worker processes for `latentd serve`
    public_url: str | None = None          # base of absolute image URLs; None: from the request
    auth: str = "on"                       # "off" switches auth off (explicit; dev without keys)
    api_keys: str = ""                     # "name:sha256hex,name2:sha256hex" (hashes only)
    keys_file: str = "~/.config/latentd/keys.json"  # {name: sha256hex}; `latentd keys create`
    signing_secret: str = ""               # HMAC secret for image URLs; required outside dev
    url_ttl_s: int = 3600                  # signed image URLs expire after this many seconds
    rate_limit_per_s: float = 5.0          # per-key token bucket refill rate; 0 = no limit
    rate_limit_burst: int = 20             # per-key bucket size (jobs admitted at once)
    sync_wait_s: float = 120.0             # /v1/images/generations waits this long, then 504
    max_body_bytes: int = 65536            # larger request bodies get 413
    max_edit_body_bytes: int = 20 * 2**20  # bodies carrying images (edits, /v1/jobs): larger get 413
    max_image_pixels: int = 4096 * 4096    # an uploaded init image or mask (Pillow's bomb guard too)
    max_prompt_chars: int = 2000           # prompt / negative_prompt length cap
    max_n: int = 4                         # images per request
    idempotency_ttl_s: int = 86400         # an Idempotency-Key is remembered this long (capped at result_ttl_s)
    retry_after_s: int = 2                 # Retry-After for 503 (queue full, nothing ready)
    metrics_token: str | None = None       # if set, /metrics needs "Authorization: Bearer <token>"
    metrics_port: int | None = None        # if set, /metrics is served on this port only
    cors_origins: str = ""                 # comma-separated origins allowed by CORS; "" = none

    # --- worker (worker/) --------------------------------
    queue_cap: int = 1000                  # max queued jobs; submit raises QueueFull beyond (API: 503)
    worker_name: str | None = None         # default: <host>-<pid>
    worker_model: str | None = None        # the model (a name in `models`) a worker serves; None = the default
    worker_max_batch: int = 16             # max requests sharing one U-Net call
    worker_memory_budget_mb: int = 0       # 0 = no budget (executor admits by max_batch only)
    # a higher-priority image steps without the lower-priority ones of its size (they sit out,
    # at most 16 steps in a row): on a CPU a bigger call is slower, so high keeps its latency alone
    worker_priority_alone: bool = True
    compile: str = "off"                   # off | on | max-autotune | cudagraphs (torch.compile the U-Net)
    job_timeout_s: float = 600.0           # a job running longer is stopped, error code "timeout"
    lease_s: float = 15.0                  # a running job's lease; refreshed every lease_s/3
    reap_interval_s: float = 5.0           # every worker requeues expired leases this often
    max_attempts: int = 3                  # claims per job; beyond, failed with "worker_lost"
    result_ttl_s: int = 86400              # job records and stored images expire after this
    storage: str = "redis"                 # redis | file | s3
    storage_dir: str = "./data/images"     # FileStore directory (storage=file)
    s3_bucket: str = ""                    # S3Store bucket (storage=s3); required then
    s3_prefix: str = "latentd/"            # object keys: <prefix><job id>/<k>.png
    s3_endpoint_url: str | None = None     # S3-compatible endpoint (MinIO, Ceph...); None = AWS
    s3_region: str | None = None           # None: from the AWS config chain
    s3_presign: bool = False               # image URLs are the store's presigned GET URLs
    s3_presign_endpoint_url: str | None = None  # endpoint clients use in presigned URLs; None = s3_endpoint_url
    s3_expire_days: int = 0                # >0: the worker sets a lifecycle rule on the prefix
    worker_metrics_port: int = 9101        # first port tried (next free one taken); 0 = none
    cpu_threads: int = 0                   # engine threads on the CPU; 0 = the cores this process may use
    device: str = "auto"                   # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"                    # auto (fp16 on cuda, else fp32) | float32 | float16 | bfloat16
    safety: bool = True                    # run the safety checker (flagged -> black image + flag)
    progress_interval_s: float = 0.25      # min seconds between progress writes per worker
    worker_heartbeat_s: float = 2.0        # worker info refresh; /readyz sees it for 3x this
    worker_grace_s: float = 20.0           # on SIGTERM: finish held work this long, then requeue it
    checkpoint_every_steps: int = 10       # save each running image's row state every this many steps
                                           # (a killed worker's job resumes there); 0 = not by steps
    checkpoint_every_s: float = 30.0       # ... or after this many seconds with a step done; 0 = not by time
    lora_cache_mb: float | None = None     # loaded adapters kept per worker (LRU, in MB); unset:
                                           # the engine's default (model/lora_library.py)

    # --- events and webhooks (app/events.py, jobs/events.py, jobs/webhooks.py) ------------
    webhook_allow: str = ""                # hosts, *.suffixes, IPs or CIDRs; "" = webhooks off
    webhook_secret: str = ""               # HMAC-SHA256 key of webhook signatures (share with receivers)
    webhook_timeout_s: float = 10.0        # per delivery attempt
    webhook_backoff_s: float = 2.0         # first retry delay; doubles per attempt
    webhook_backoff_max_s: float = 300.0   # longest delay between attempts
    webhook_max_age_s: float = 3600.0      # give up this long after the job ended

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v):
        """A sentinel URL is checked at start-up (config/redis_url.py), not at the first request."""
        from latentd.config.redis_url import is_sentinel, parse_sentinel

        if isinstance(v, str) and is_sentinel(v):
            parse_sentinel(v)
        return v

    @field_validator("model", "s3_endpoint_url", "s3_presign_endpoint_url", "s3_region",
                     "worker_name", "worker_model", "lora_dir", "lora_cache_mb", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        """`LATENTD_MODEL=` (as compose writes `${LATENTD_MODEL:-}`) means "not set"."""
        return None if isinstance(v, str) and not v.strip() else v


@lru_cache
def get_settings() -> Settings:
    return Settings()
