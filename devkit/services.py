"""Real processes for integration tests: a redis-server with deploy/redis.conf in a temp dir (that
can be SIGKILLed and restarted on the same port and data, to test AOF recovery), and
`python -m latentd.cli worker` subprocesses that we wait on until their ready heartbeat shows.

Everything started here is killed by its owner's `stop()`; fixtures call it in `finally`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIS_CONF = ROOT / "deploy" / "redis.conf"


def poll(what, timeout=180.0, every=0.05, name: str = "a condition"):
    """Call `what` until it returns something truthy (returned), failing after `timeout` s with
    `name`. every=0 checks back to back (to catch a worker between two fast steps)."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {name}; last: {got!r}"
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(path):
        raise RuntimeError("redis-server not found on PATH")
    return path


class RedisServer:
    """redis-server on a free port, data in its own temp dir (AOF on, as in production)."""

    def __init__(self, port: int | None = None, workdir: str | None = None):
        self.port = port or free_port()
        self.dir = workdir or tempfile.mkdtemp(prefix="latentd-redis-")
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(self.dir, "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        self.proc = subprocess.Popen(
            [redis_server_binary(), str(REDIS_CONF), "--port", str(self.port), "--dir", self.dir,
             "--logfile", self.log, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return self
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {open(self.log).read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.05)

    def client(self, **kw):
        import redis

        return redis.Redis.from_url(self.url, **kw)

    def kill(self) -> None:
        """SIGKILL (no shutdown save: only the AOF survives, as in a crash)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> "RedisServer":
        self.kill()
        return self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def worker_env(redis_url: str, model: str | None, **settings) -> dict:
    """Environment for a worker subprocess: LATENTD_* from keyword arguments."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTD_")}
    env.update({"LATENTD_REDIS_URL": redis_url, "LATENTD_ENV": "dev", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "LATENTD_WORKER_METRICS_PORT": "0"})
    if model:
        env["LATENTD_MODEL"] = str(model)
    for k, v in settings.items():
        env[f"LATENTD_{k.upper()}"] = str(v)
    if settings.get("cpu_threads"):          # OpenMP's own variables win over latentd's setting
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(settings["cpu_threads"])
    return env


class WorkerProc:
    """`python -m latentd.cli worker` as a subprocess with a known name."""

    def __init__(self, redis_url: str, model: str | None, name: str | None = None,
                 args: tuple[str, ...] = (), **settings):
        self.name = name or f"w{free_port()}"
        self.args = list(args)             # after `latentd worker`, e.g. ["--devices", "cpu,cpu"]
        self.env = worker_env(redis_url, model, worker_name=self.name, **settings)
        self.redis_url = redis_url
        self.proc: subprocess.Popen | None = None
        self.logfile = tempfile.NamedTemporaryFile(prefix=f"latentd-{self.name}-", suffix=".log",
                                                   delete=False)

    def start(self) -> "WorkerProc":
        self.proc = subprocess.Popen([sys.executable, "-m", "latentd.cli", "worker", *self.args], cwd=ROOT,
                                     env=self.env, stdout=self.logfile, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 120.0) -> "WorkerProc":
        """Until this worker's heartbeat says its model is loaded (what /readyz looks at)."""
        import redis

        from latentd.jobs import keys

        r = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited {self.proc.returncode}:\n{self.output()}")
            try:
                if r.hget(keys.worker(self.name), "state") in (b"ready", b"busy"):
                    return self
            except redis.exceptions.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.logfile.flush()
        try:
            with open(self.logfile.name, errors="replace") as f:
                return f.read()[-6000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None

    def stop(self) -> None:
        self.kill()
        try:
            os.unlink(self.logfile.name)
        except OSError:
            pass


# Worker settings that make leases, reaping and heartbeats fast enough for tests.
FAST = dict(lease_s=3, reap_interval_s=1, worker_heartbeat_s=0.5, progress_interval_s=0.05)


def wait_status(c, jid, owner, statuses, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = c.get(jid, owner)
        if d and d["status"] in statuses:
            return d
        time.sleep(0.02)
    raise AssertionError(f"job {jid} not in {statuses} after {timeout}s: {c.get(jid, owner)}")


def assert_exactly_once(stack, jids, owner="o", queue="latentd"):
    """Every job terminal; every succeeded job has exactly n distinct images, each stored."""
    from latentd.jobs import keys

    c = stack.client()
    r = stack.redis.client()
    statuses = {}
    for j in jids:
        d = c.get(j, owner)
        assert d is not None, f"job {j} lost"
        statuses[j] = d["status"]
        n = d["params"]["n"]
        rec = stack.record(j)
        imgs = [k for k in rec if k.startswith("img:")]
        assert len(imgs) == len(set(imgs)) == int(rec["done"]) <= n
        if d["status"] == "succeeded":
            assert sorted(i["index"] for i in d["images"]) == list(range(n))
            assert all(r.exists(keys.image(j, k)) for k in range(n))
    assert r.zcard(keys.leases(queue)) == 0 and r.zcard(keys.rq_started(queue)) == 0
    assert r.llen(keys.rq_queue(queue)) == 0
    return statuses


def scrape(port) -> dict[str, float]:
    """A process's /metrics as {series: value}; no prompt text may appear in it."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "prompt" not in text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}
