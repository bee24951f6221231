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
- Sharing: even with a short spin, two threads on two cores run at the pace of the slower one,
  and a busy neighbour makes one of them wait a whole time slice per parallel region. ThreadGovernor
  watches what the other processes use (/proc/stat minus this process, niced processes counted as
  idle since they yield to us) and gives torch only the cores left free: all of them on an idle
  machine, one fewer per busy neighbour. Re-decided every `interval` seconds between steps.
The operator's own OMP_NUM_THREADS / OMP_WAIT_POLICY / GOMP_SPINCOUNT always win.
"""
from __future__ import annotations

import math
import os
import time

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


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of all CPUs not counting niced user time, niced user time) from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + system + irq + softirq + steal, nice


def _own_jiffies() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])             # utime + stime
    except (OSError, ValueError, IndexError):
        return None


class ThreadGovernor:
    """Intra-op threads = the usable cores other (non-niced) processes leave free, at least 1.
    tick() between steps; it re-measures every `interval` s and calls set_threads(n) on a change."""

    def __init__(self, max_threads: int, set_threads, interval: float = 0.5, clock=time.monotonic):
        self.max = max(1, int(max_threads))
        self.set_threads, self.interval, self.clock = set_threads, interval, clock
        self.threads = self.max
        self.niced = os.getpriority(os.PRIO_PROCESS, 0) > 0 if hasattr(os, "getpriority") else False
        self._last = (clock(), _cpu_jiffies(), _own_jiffies())

    def decide(self, others_cores: float) -> int:
        """Threads for a machine where other processes keep `others_cores` cores busy."""
        return max(1, min(self.max, math.floor(self.max - others_cores + 0.5)))

    def tick(self) -> int:
        now = self.clock()
        t0, cpu0, own0 = self._last
        if now - t0 < self.interval:
            return self.threads
        cpu1, own1 = _cpu_jiffies(), _own_jiffies()
        self._last = (now, cpu1, own1)
        if None in (cpu0, cpu1, own0, own1):
            return self.threads
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = cpu1[0] - cpu0[0]
        ours = 0 if self.niced else own1 - own0     # a niced process's user time is in `nice`
        others = max(0.0, (busy - ours) / hz / (now - t0))        # cores busy with others' work
        n = self.decide(others)
        if n != self.threads:
            self.threads = n
            self.set_threads(n)
        return n
