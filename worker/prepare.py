"""What a worker does to its loaded pipeline before it says it is ready.

1. `LATENTD_COMPILE` other than "off": torch.compile the U-Net step (model/compile.py) and warm
   it up, compiling every batch bucket at the model's native size, so that no request waits for a
   compile and /readyz (which counts ready workers) stays 503 until this is done. Every compile,
   in the warm-up or later (a new latent size), counts in latentd_worker_compiles_total.
2. `LATENTD_WORKER_MEMORY_BUDGET_MB` set, on CUDA: measure what a request costs on the device
   (model/memory.py) and admit against the budget left after weights and fixed workspace. On the
   CPU (no peak-allocation counter) the executor's calibrated estimate stays.
"""
from __future__ import annotations

import logging

from latentd.worker import metrics

log = logging.getLogger("latentd.worker")


def prepare(pipe, settings):
    """-> (memory budget for requests in flight in MB or None, per-request estimate or None),
    the BatchExecutor's memory_budget_mb and memory_estimate."""
    from latentd.model import compile as compiling
    from latentd.model.memory import measure

    from latentd.model.precision import tune_cuda

    mode = compiling.check_mode(settings.compile, pipe.device)
    if pipe.device.type == "cuda":
        tune_cuda()
    unet = compiling.enable(pipe, mode, settings.worker_max_batch)
    if unet is not None:
        def counted(key, seconds):
            metrics.COMPILES.inc()
            metrics.COMPILE_SECONDS.inc(seconds)
            log.info("compiled the U-Net for %d rows at %dx%d latent in %.1fs", key[0], key[1], key[2], seconds)

        unet.on_compile = counted
        seconds = compiling.warmup(pipe)
        log.info("warm-up (compile %s): %d shape(s) in %.1fs", mode, unet.compiles, seconds)
    budget = settings.worker_memory_budget_mb or None
    if budget is None:
        return None, None
    cost = measure(pipe, n=max(2, min(4, settings.worker_max_batch)))
    if cost is None:
        return float(budget), None
    left = cost.request_budget(budget)
    if left < cost.per_request_mb:
        log.warning("LATENTD_WORKER_MEMORY_BUDGET_MB=%d leaves %.0f MB after weights and workspace: "
                    "too little for one request at the native size (%.0f MB)", budget, left,
                    cost.per_request_mb)
    log.info("memory: weights %.0f MB, fixed %.0f MB, %.0f MB per request at %dx%d latent; "
             "%.0f MB of the %d MB budget left for requests", cost.weights_mb, cost.fixed_mb,
             cost.per_request_mb, cost.size[0], cost.size[1], left, budget)
    metrics.REQUEST_MEMORY.set(cost.per_request_mb * 2**20)
    return left, cost.estimate
