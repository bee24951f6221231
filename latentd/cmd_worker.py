"""`latentd worker`: one worker process (model loaded once, batched, never forks); see worker/loop.py.
With --devices, one worker process per device under a supervisor (worker/supervisor.py); with
several --model, one worker process per model (and device): a worker serves one model's queue."""
from __future__ import annotations

import logging


def add_arguments(p) -> None:
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="a model to serve, repeatable: NAME=PATH, PATH (named after its folder) or "
                        "the NAME of a model LATENTD_MODELS lists (default: the deployment's "
                        "default model: the first of LATENTD_MODELS, else LATENTD_MODEL or bundled)")
    p.add_argument("--name", help="worker name (default: LATENTD_WORKER_NAME or <host>-<pid>)")
    p.add_argument("--max-batch", type=int, help="requests per U-Net call (LATENTD_WORKER_MAX_BATCH)")
    p.add_argument("--metrics-port", type=int,
                   help="first Prometheus port to try, 0 = off (LATENTD_WORKER_METRICS_PORT)")
    p.add_argument("--devices",
                   help="one worker process per device: 'all' (every CUDA device) or a list such "
                        "as cuda:0,cuda:1 or cpu,cpu")


def run(args) -> int:
    from latentd.config.settings import get_settings

    from latentd.jobs.models import served, with_cli
    from latentd.worker.supervisor import CANNOT_START

    s = get_settings()
    logging.basicConfig(level=s.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names: list[str] = []
    try:
        over = {k: v for k, v in (("worker_name", args.name), ("worker_max_batch", args.max_batch),
                                  ("worker_metrics_port", args.metrics_port)) if v is not None}
        if args.model:
            over["models"], names = with_cli(s, args.model)
            if len(names) == 1:
                over["worker_model"] = names[0]
        s = s.model_copy(update=over)
        served(s)                                  # a bad LATENTD_MODELS / WORKER_MODEL: say so
    except ValueError as e:
        logging.getLogger("latentd.worker").error("%s", e)
        return CANNOT_START
    if args.devices is not None or len(names) > 1:
        # the supervisor computes nothing: each worker chooses its own threads (its affinity)
        return supervise(args.devices or s.device, s, over, names if len(names) > 1 else None)
    from latentd.worker import cpu

    threads = cpu.configure(s.cpu_threads)        # before torch is imported (by worker.loop)
    from latentd.worker.loop import Worker

    logging.getLogger("latentd.worker").info("cpu threading: %s", threads)
    return Worker(s).run()


def supervise(spec: str, s, over: dict, models: list[str] | None) -> int:
    from latentd.worker import supervisor

    try:
        devices = [spec] if spec == "auto" else supervisor.parse_devices(spec)
    except (ValueError, RuntimeError) as e:
        logging.getLogger("latentd.supervisor").error("%s", e)
        return 2
    env = {f"LATENTD_{k.upper()}": str(v) for k, v in over.items()
           if k not in ("worker_name", "worker_metrics_port")}
    return supervisor.run(devices, env, s.worker_name, s.worker_metrics_port, s.worker_grace_s, models)
