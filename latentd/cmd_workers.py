"""`latentd workers`: the workers whose heartbeat is fresh, read from Redis (torch-free).

Each worker publishes its name, host, pid, device, model, state and metrics address in its Redis
record (latentd:worker:<name>). `--format prometheus` prints them as a Prometheus file_sd target
list, so one Prometheus can follow every worker on every host that shares this Redis:
    latentd workers --format prometheus > /etc/prometheus/latentd-workers.json   (e.g. every minute)
with `file_sd_configs: [{files: [/etc/prometheus/latentd-workers.json]}]` in the scrape job.
"""
from __future__ import annotations

import json
from urllib.parse import urlsplit


def add_arguments(p) -> None:
    p.add_argument("--format", choices=("table", "json", "prometheus"), default="table",
                   help="table (default), json, or a Prometheus file_sd target list")


def run(args) -> int:
    from latentd.config.settings import get_settings
    from latentd.jobs.client import JobClient
    from latentd.worker.recovery import connect

    s = get_settings()
    client = JobClient(connect(s.redis_url), s)
    by_model = client.workers_by_model()
    workers = sorted((w for ws in by_model.values() for w in ws), key=lambda w: w["name"])
    if args.format == "json":
        print(json.dumps(workers, indent=2))
    elif args.format == "prometheus":
        groups = []
        for m in client.deployed:              # one target group per model: labels say which
            targets = sorted(urlsplit(w["metrics_url"]).netloc for w in by_model[m.name]
                             if w.get("metrics_url"))
            if targets:
                groups.append({"targets": targets, "labels": {"queue": m.queue}})
        print(json.dumps(groups, indent=2))
    else:
        print(f"{'NAME':<28} {'STATE':<6} {'DEVICE':<8} {'RUN':>3}  {'MODEL':<20} METRICS")
        for w in workers:
            model = (w.get("model") or {}).get("name", "?")
            print(f"{w['name']:<28} {w.get('state', '?'):<6} {w.get('device', '?'):<8} "
                  f"{w.get('running', 0):>3}  {model:<20} {w.get('metrics_url', '-')}")
    return 0
