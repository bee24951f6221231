"""`python -m latentd.worker.probe [--count N]`: health check of the worker(s) in this container.

Exit 0 when each worker's /metrics answers on 127.0.0.1 (it is served only once the model is
loaded) and reports `latentd_worker_stalled 0` (the main loop is making progress); else 1 with
the reason on stderr. Used by the image's HEALTHCHECK and the Kubernetes probes. Ports: the
first N from LATENTD_WORKER_METRICS_PORT (a supervisor with --devices gives worker i base + i).
Torch-free and quick: it must not compete with the worker it checks.
"""
from __future__ import annotations

import argparse
import re
import sys
import urllib.request

from latentd.config.settings import Settings

_STALLED = re.compile(r"^latentd_worker_stalled (\S+)$", re.M)


def check(port: int, timeout: float = 3.0) -> str | None:
    """None if healthy, else why not."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout).read().decode()
    except OSError as e:
        return f"port {port}: /metrics does not answer ({e}); loading, or not running"
    m = _STALLED.search(text)
    if m is None:
        return f"port {port}: not a latentd worker (no latentd_worker_stalled)"
    if float(m.group(1)) != 0:
        return f"port {port}: the worker's main loop is stalled"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m latentd.worker.probe")
    p.add_argument("--count", type=int, default=1, help="workers in this container (--devices)")
    p.add_argument("--port", type=int, help="first port (default LATENTD_WORKER_METRICS_PORT)")
    a = p.parse_args(argv)
    base = a.port or Settings().worker_metrics_port
    if not base:
        print("LATENTD_WORKER_METRICS_PORT=0: nothing to probe", file=sys.stderr)
        return 1
    problems = [why for why in (check(base + i) for i in range(a.count)) if why]
    for why in problems:
        print(why, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
