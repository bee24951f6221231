"""`latentd worker --devices cuda:0,cuda:1 | all`: one worker process per device, one supervisor;
`latentd worker --model a=PATH --model b=PATH`: one worker process per model (per device), each
serving its model's queue (LATENTD_WORKER_MODEL).

Why processes and not threads: each worker owns one device, loads its model once and keeps its
own CUDA context and thread pools; a crash (an OOM kill, a driver fault) takes down one device's
worker, not the host's. The supervisor itself is torch-free (it counts GPUs for `all` in a child
process) and:
  - starts `latentd worker` once per device with LATENTD_DEVICE=<device>, its own name
    (`<name>-<i>` when a name is given, else the default `<host>-<pid>`) and metrics port
    `base + i` (each child still takes the next free port if that one is taken); several `cpu`
    workers get disjoint shares of the cores (CPU affinity),
  - forwards SIGTERM/SIGINT to every child and waits: each finishes or hands back its batch
    within LATENTD_WORKER_GRACE_S, so stopping the supervisor loses no job,
  - restarts a child that dies on its own (crash, OOM kill) with a backoff; a child that cannot
    start (exit code 2: bad model, bad device) is not restarted. When no child is left, it exits
    with the worst child exit code.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("latentd.supervisor")

DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
CANNOT_START = 2               # latentd worker's exit code when its model or device cannot load


def cuda_count() -> int:
    """Visible CUDA devices, counted in a child process so the supervisor never imports torch."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"could not count CUDA devices: {out.stderr.strip()[-500:]}")
    return int(out.stdout.strip() or 0)


def parse_devices(spec: str, count=cuda_count) -> list[str]:
    """'cuda:0,cuda:1' / 'cpu,cpu' / 'all' (every visible CUDA device) -> device names."""
    spec = (spec or "").strip()
    if spec == "all":
        n = count()
        if n == 0:
            raise ValueError("--devices all: no CUDA device is visible; name devices instead, "
                             "e.g. --devices cpu")
        return [f"cuda:{i}" for i in range(n)]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    bad = [d for d in devices if not DEVICE.match(d)]
    if not devices or bad:
        raise ValueError(f"--devices: expected 'all' or a comma-separated list of cpu, mps, cuda, "
                         f"cuda:N; got {spec!r}")
    return devices


def _child_setup(cpus: set[int] | None):
    """Runs in the child before exec (Linux): SIGTERM it when the supervisor dies, even by
    SIGKILL, so an orphaned worker still hands its batch back instead of running unsupervised;
    pin it to its share of the cores when several workers compute on the CPU."""
    def setup() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


def split_cpus(n: int) -> list[set[int] | None]:
    """n CPU workers on one host: disjoint core sets (each worker sizes its thread pool from its
    affinity), rather than n pools all spinning on every core. None when there are fewer cores
    than workers or no affinity API."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return [None] * n
    if n < 2 or len(cores) < n:
        return [None] * n
    return [set(cores[i * len(cores) // n:(i + 1) * len(cores) // n]) for i in range(n)]


@dataclass
class Child:
    index: int
    device: str
    env: dict
    cpus: set[int] | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = 1.0
    restart_at: float | None = None
    termed: bool = False


class Supervisor:
    def __init__(self, devices: list[str], env: dict[str, str], name: str | None,
                 metrics_base: int, grace_s: float, models: list[str] | None = None):
        self.grace_s = grace_s
        self.stopping = False
        self.children: list[Child] = []
        pairs = [(m, d) for m in (models or [None]) for d in devices]
        for i, (model, dev) in enumerate(pairs):
            e = dict(env, LATENTD_DEVICE=dev,
                     LATENTD_WORKER_METRICS_PORT=str(metrics_base + i if metrics_base else 0))
            if model is not None:
                e["LATENTD_WORKER_MODEL"] = model
            if name:
                e["LATENTD_WORKER_NAME"] = f"{name}-{i}"
            else:
                e.pop("LATENTD_WORKER_NAME", None)      # default <host>-<pid>: distinct per child
            self.children.append(Child(i, dev, e))
        on_cpu = [c for c in self.children if c.device == "cpu"]
        for c, cpus in zip(on_cpu, split_cpus(len(on_cpu))):
            c.cpus = cpus

    def start(self, c: Child) -> None:
        c.proc = subprocess.Popen([sys.executable, "-m", "latentd.cli", "worker"], env=c.env,
                                  preexec_fn=_child_setup(c.cpus))
        c.started, c.restart_at, c.termed = time.monotonic(), None, False
        log.info("worker %d on %s: pid %d%s", c.index, c.device, c.proc.pid,
                 f", cores {sorted(c.cpus)}" if c.cpus else "")

    def _on_signal(self, signum, _frame):
        if not self.stopping:
            log.info("signal %d: stopping %d worker(s) (grace %.0fs)", signum,
                     len(self.children), self.grace_s)
        self.stopping = True
        for c in self.children:
            self.terminate(c)

    @staticmethod
    def terminate(c: Child) -> None:
        """SIGTERM a running child once (the run loop also calls it for a child started while
        the signal was being handled)."""
        if c.proc is not None and not c.termed and c.proc.poll() is None:
            c.termed = True
            c.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for c in self.children:
            self.start(c)
        codes: list[int] = []
        kill_at = None
        while self.children:
            now = time.monotonic()
            if self.stopping and kill_at is None:
                kill_at = now + self.grace_s + 15.0     # the children's own grace, then some
            for c in list(self.children):
                rc = c.proc.poll() if c.proc is not None else None
                if c.proc is None:
                    if self.stopping:
                        self.children.remove(c)
                    elif now >= c.restart_at:
                        self.start(c)
                    continue
                if rc is None:
                    if self.stopping:
                        self.terminate(c)
                    if kill_at is not None and now > kill_at:
                        log.warning("worker %d on %s did not stop in time: killing", c.index, c.device)
                        c.proc.kill()
                    continue
                if self.stopping or rc == 0:
                    codes.append(rc)
                    self.children.remove(c)
                elif rc == CANNOT_START:
                    log.error("worker %d on %s cannot start (exit %d); not restarting it",
                              c.index, c.device, rc)
                    codes.append(rc)
                    self.children.remove(c)
                else:
                    if now - c.started > 60:             # it had been running: start over quickly
                        c.backoff = 1.0
                    log.warning("worker %d on %s died (exit %d); restarting in %.0fs",
                                c.index, c.device, rc, c.backoff)
                    c.proc, c.restart_at = None, now + c.backoff
                    c.backoff = min(c.backoff * 2, 60.0)
            time.sleep(0.2)
        return max((abs(x) for x in codes), default=0)


def run(devices: list[str], env_over: dict[str, str], name: str | None, metrics_base: int,
        grace_s: float, models: list[str] | None = None) -> int:
    env = {**os.environ, **env_over}
    return Supervisor(devices, env, name, metrics_base, grace_s, models).run()
