"""A replicated Redis for failover tests and benches: a master, a replica and three sentinels,
real processes on loopback (redis-server, and `redis-server <conf> --sentinel`), with a quick
failure detector (down-after 1 s). `url` is the redis+sentinel:// URL latentd takes.

    group = SentinelGroup().start()      # master + replica linked, sentinels agree on both
    group.kill_master()                  # SIGKILL
    group.wait_promoted(old)             # until the sentinels name the replica
    group.restart(old)                   # the old master returns (as a replica, told by Sentinel)
    group.stop()
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

from devkit.services import REDIS_CONF, free_port, redis_server_binary

SERVICE = "mymaster"


class _Proc:
    def __init__(self, args: list[str], log: str):
        self.args, self.log, self.proc = args, log, None

    def start(self) -> "_Proc":
        with open(self.log + ".out", "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def _wait(what: str, cond, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except SystemExit as e:
            raise RuntimeError(str(e)) from None
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not after {timeout}s")


class SentinelGroup:
    def __init__(self, down_after_ms: int = 1000, failover_timeout_ms: int = 3000):
        self.dir = tempfile.mkdtemp(prefix="latentd-sentinel-")
        self.ports = {"a": free_port(), "b": free_port()}       # data servers
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.servers: dict[str, _Proc] = {}
        self.sentinels: list[_Proc] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def _server(self, name: str, replica_of: int | None = None) -> _Proc:
        d = os.path.join(self.dir, name)
        os.makedirs(d, exist_ok=True)
        conf = os.path.join(d, "redis.conf")    # a copy: Sentinel's CONFIG REWRITE edits it
        if not os.path.exists(conf):
            shutil.copy(REDIS_CONF, conf)
        args = [redis_server_binary(), conf, "--port", str(self.ports[name]), "--dir", d,
                "--logfile", os.path.join(d, "redis.log"), "--daemonize", "no"]
        if replica_of:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        return _Proc(args, os.path.join(d, "redis.log")).start()

    def _alive(self, name: str) -> bool:
        p = self.servers[name]
        if p.proc.poll() is not None:
            tail = "".join(open(f, errors="replace").read()[-1500:] for f in (p.log, p.log + ".out")
                           if os.path.exists(f))
            raise SystemExit(f"redis-server {name} exited {p.proc.returncode}: {tail}")
        return True

    def client(self, port: int, **kw):
        import redis

        return redis.Redis(port=port, socket_timeout=kw.pop("socket_timeout", 1), **kw)

    def start(self, timeout: float = 30.0) -> "SentinelGroup":
        self.servers["a"] = self._server("a")
        _wait("master up", lambda: self._alive("a") and self.client(self.ports["a"]).ping(), timeout)
        self.servers["b"] = self._server("b", replica_of=self.ports["a"])
        _wait("replica linked", lambda: self.client(self.ports["b"]).info("replication")
              .get("master_link_status") == "up", timeout)
        for i, port in enumerate(self.sentinel_ports):
            d = os.path.join(self.dir, f"s{i}")
            os.makedirs(d, exist_ok=True)
            conf = os.path.join(d, "sentinel.conf")
            with open(conf, "w") as f:
                f.write(f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {d}\n"
                        f"logfile {os.path.join(d, 'sentinel.log')}\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {self.ports['a']} 2\n"
                        f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                        f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
                        f"sentinel parallel-syncs {SERVICE} 1\n")
            self.sentinels.append(_Proc([redis_server_binary(), conf, "--sentinel"],
                                        os.path.join(d, "sentinel.log")).start())

        def agreed():      # every sentinel knows the replica and the two other sentinels
            for port in self.sentinel_ports:
                m = self.client(port).sentinel_master(SERVICE)
                if m["num-slaves"] < 1 or m["num-other-sentinels"] < 2:
                    return False
            return True

        _wait("sentinels agree", agreed, timeout)
        return self

    def master_port(self) -> int:
        for port in self.sentinel_ports:
            try:
                return int(self.client(port).sentinel_get_master_addr_by_name(SERVICE)[1])
            except Exception:  # noqa: BLE001 - ask the next sentinel
                continue
        raise RuntimeError("no sentinel answers")

    def name_of(self, port: int) -> str:
        return next(n for n, p in self.ports.items() if p == port)

    def kill(self, name: str) -> None:
        self.servers[name].kill()

    def wait_promoted(self, old: str, timeout: float = 30.0) -> str:
        """Until the sentinels name another master and it answers as one; returns its name."""
        old_port = self.ports[old]

        def promoted():
            port = self.master_port()
            return port != old_port and self.client(port).info("replication")["role"] == "master" and port
        return self.name_of(_wait("failover", promoted, timeout))

    def restart(self, name: str, replica_of: str | None = None) -> None:
        """Start a killed server again on its port and data: as a replica of `replica_of` (what
        Sentinel would make it, a few seconds sooner), or as it was."""
        self.servers[name] = self._server(name, self.ports[replica_of] if replica_of else None)

    def wait_replica(self, master: str, timeout: float = 30.0) -> None:
        _wait("a replica of the new master", lambda: self.client(self.ports[master])
              .info("replication").get("connected_slaves", 0) >= 1, timeout)

    def stop(self) -> None:
        for p in self.sentinels + list(self.servers.values()):
            p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
