"""`latentd worker`: one worker process (model loaded once, batched, never forks); see worker/loop.py."""
from __future__ import annotations

import logging


def add_arguments(p) -> None:
    p.add_argument("--model", help="model folder / *.safetensors / hub id (default: LATENTD_MODEL or bundled)")
    p.add_argument("--name", help="worker name (default: LATENTD_WORKER_NAME or <host>-<pid>)")
    p.add_argument("--max-batch", type=int, help="requests per U-Net call (LATENTD_WORKER_MAX_BATCH)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off (LATENTD_WORKER_METRICS_PORT)")


def run(args) -> int:
    from latentd import cpu
    from latentd.settings import get_settings

    s = get_settings()
    threads = cpu.configure(s.cpu_threads)        # before torch is imported (by worker.loop)
    from worker.loop import Worker
    over = {k: v for k, v in (("model", args.model), ("worker_name", args.name),
                              ("worker_max_batch", args.max_batch),
                              ("worker_metrics_port", args.metrics_port)) if v is not None}
    if over:
        s = s.model_copy(update=over)
    logging.basicConfig(level=s.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("latentd.worker").info("cpu threading: %s", threads)
    return Worker(s).run()
