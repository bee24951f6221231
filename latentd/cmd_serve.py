"""`latentd serve`: the API under uvicorn (N worker processes). Refuses to start on an insecure
configuration (no API keys, no signing secret) unless LATENTD_ENV=dev; auth goes off only with
--insecure-no-auth or LATENTD_AUTH=off. Never imports torch."""
from __future__ import annotations

import os
import sys


def add_arguments(p) -> None:
    p.add_argument("--host", help="bind address (LATENTD_HOST)")
    p.add_argument("--port", type=int, help="port (LATENTD_PORT)")
    p.add_argument("--workers", type=int, help="uvicorn worker processes (LATENTD_API_WORKERS)")
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="a model to serve, repeatable: NAME=PATH or PATH (named after its folder); "
                        "the first is the default (LATENTD_MODELS; default: the bundled model)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve WITHOUT API keys (anyone who can reach the port can use it)")


def run(args) -> int:
    # CLI flags become settings in the environment, so every uvicorn worker sees the same.
    for flag, var in (("host", "LATENTD_HOST"), ("port", "LATENTD_PORT"), ("workers", "LATENTD_API_WORKERS")):
        if getattr(args, flag) is not None:
            os.environ[var] = str(getattr(args, flag))
    if args.insecure_no_auth:
        os.environ["LATENTD_AUTH"] = "off"
    from latentd.jobs.models import deployment, settings_with_flags

    try:
        s = settings_with_flags(args.model)
        deployment(s)
    except ValueError as e:
        print(f"latentd serve: {e}", file=sys.stderr)
        return 2
    own_dir = None
    if s.api_workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile

        # every uvicorn worker writes its counters here; /metrics adds them up
        own_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="latentd-prom-")
    from latentd.app.main import config_problems
    from latentd.app.state import make_redis

    problems = config_problems(s)
    if problems:
        print("latentd serve: refusing to start:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    if s.metrics_port:
        from prometheus_client import start_http_server

        from latentd.app.metrics import registry_for
        from latentd.jobs.client import JobClient

        start_http_server(s.metrics_port, addr=s.host, registry=registry_for(JobClient(make_redis(s), s)))
    import uvicorn

    print(f"latentd API on http://{s.host}:{s.port} ({s.api_workers} process(es))", file=sys.stderr)
    try:
        # open event streams would hold a restart forever: they are cut after 10 s, and their
        # clients resume with Last-Event-ID
        uvicorn.run("latentd.app.main:app_from_env", factory=True, host=s.host, port=s.port,
                    workers=s.api_workers, log_level=s.log_level, access_log=False,
                    timeout_graceful_shutdown=10)
    finally:
        if own_dir:
            import shutil

            shutil.rmtree(own_dir, ignore_errors=True)
    return 0
