"""CPU threading for the processes that run the engine (worker, `latentd generate`), decided
before torch is imported (OpenMP reads its environment once, at start-up).

Two problems on a shared CPU, both measured with bench/cpu_contention.py:
- Oversubscription: OpenMP starts one thread per core of the machine, even when the process may
  use fewer (CPU affinity, a container's cgroup CPU quota). Threads = what the process may use.
- Spinning: libgomp's threads busy-wait for the next parallel region (GOMP_SPINCOUNT, 300,000
  spins by default, far more with OMP_WAIT_POLICY=ACTIVE). When a neighbour holds a core, a
  thread spins through its whole time slice while the thread it waits for is not running, and
  a small model's many short parallel regions each pay that: one busy neighbour made the worker
  ~190x slower. OMP_WAIT_POLICY=PASSIVE (no spinning) fixes that but sleeps between every op,
  which costs a small model ~2x when the machine is idle. A short spin keeps threads hot across
  the gaps between ops and yields the core quickly when it is contended.
The operator's own OMP_NUM_THREADS / OMP_WAIT_POLICY / GOMP_SPINCOUNT always win.
"""
from __future__ import annotations

import math
import os

SPINCOUNT = 10000      # libgomp spins before a waiting thread sleeps (see bench/cpu_contention.py)


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max or v1 cfs_quota/period), None = no quota."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """Cores this process may run on: its affinity mask, capped by the cgroup quota (>= 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:              # not on Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def configure(threads: int = 0, environ=os.environ) -> dict[str, str]:
    """Set the OpenMP environment for this process (call before importing torch).
    threads: 0 = usable_cpus(). Returns what was decided, for the start-up log."""
    if "OMP_NUM_THREADS" not in environ or threads:
        environ["OMP_NUM_THREADS"] = str(threads or usable_cpus())
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = str(SPINCOUNT)
    return {k: environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in environ}
