"""Several workers on one host with default settings: distinct metrics ports (the first free one
from LATENTD_WORKER_METRICS_PORT), each published in the worker's Redis record and log, and
`latentd worker --devices cpu,cpu` running one worker process per device under a supervisor.
Real redis-server, real worker processes, the tiny model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from devkit.services import FAST, ROOT, WorkerProc, free_port, wait_status
from latentd.jobs import keys
from latentd.jobs.client import JobClient
from latentd.jobs.spec import JobSpec
from latentd.worker.supervisor import parse_devices, split_cpus


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def wait_workers(r, names, timeout=120.0) -> dict[str, dict]:
    """name -> worker record (str fields) once every named worker is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = {n: {k.decode(): v.decode() for k, v in r.hgetall(keys.worker(n)).items()}
                 for n in names}
        if all(i.get("state") in ("ready", "busy") for i in infos.values()):
            return infos
        time.sleep(0.1)
    raise AssertionError(f"workers not ready: {infos}")


def test_parse_devices():
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices(" cuda:0, cuda:1 ") == ["cuda:0", "cuda:1"]
    assert parse_devices("all", count=lambda: 3) == ["cuda:0", "cuda:1", "cuda:2"]
    for bad in ("", "gpu0", "cuda:x", "cpu,,tpu"):
        with pytest.raises(ValueError, match="--devices"):
            parse_devices(bad)
    with pytest.raises(ValueError, match="no CUDA device"):
        parse_devices("all", count=lambda: 0)


def test_split_cpus():
    cores = sorted(os.sched_getaffinity(0))
    assert split_cpus(1) == [None]                           # one worker keeps every core
    assert split_cpus(len(cores) + 1) == [None] * (len(cores) + 1)
    if len(cores) >= 2:
        parts = split_cpus(2)
        assert set().union(*parts) == set(cores) and not parts[0] & parts[1]


def test_two_workers_same_base_port_both_serve_metrics(redis_server, tiny_model):
    """Two `latentd worker` started at the same moment with the same (default-style) base port:
    both start, each takes its own port, publishes it, and serves its own /metrics."""
    base = free_port()
    ws = [WorkerProc(redis_server.url, str(tiny_model), worker_metrics_port=base, **FAST)
          for _ in range(2)]
    try:
        for w in ws:
            w.start()
        for w in ws:
            w.wait_ready()
        infos = wait_workers(redis_server.client(), [w.name for w in ws])
        ports = {n: int(i["metrics_port"]) for n, i in infos.items()}
        assert len(set(ports.values())) == 2 and min(ports.values()) == base, ports
        for w in ws:
            port = ports[w.name]
            url = infos[w.name]["metrics_url"]
            # the address on the route to Redis (loopback here): reachable as published
            assert url == f"http://127.0.0.1:{port}/metrics", url
            assert url in w.output()                                    # the log line
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            assert "latentd_worker_model_load_seconds" in text
            assert "latentd_worker_stalled 0.0" in text
        # the API's view (JobClient.ready_workers) carries the addresses too
        ready = JobClient(redis_server.client(), _settings(redis_server)).ready_workers()
        assert sorted(x["metrics_port"] for x in ready) == sorted(ports.values())
        # `latentd workers`: what an operator runs to find them (and Prometheus' file_sd list)
        env = {**os.environ, "LATENTD_REDIS_URL": redis_server.url, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-m", "latentd.cli", "workers", "--format", "prometheus"],
                             capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        (group,) = json.loads(out.stdout)
        assert sorted(int(t.rsplit(":", 1)[1]) for t in group["targets"]) == sorted(ports.values())
        table = subprocess.run([sys.executable, "-m", "latentd.cli", "workers"], capture_output=True,
                               text=True, timeout=60, env=env, cwd=ROOT).stdout
        assert all(infos[w.name]["metrics_url"] in table for w in ws), table
        # the container health check (HEALTHCHECK, Kubernetes probes) sees both as healthy
        for port in ports.values():
            probe = subprocess.run([sys.executable, "-m", "latentd.worker.probe", "--port", str(port)],
                                   capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
            assert probe.returncode == 0, probe.stderr
        nobody = free_port()
        probe = subprocess.run([sys.executable, "-m", "latentd.worker.probe", "--port", str(nobody)],
                               capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert probe.returncode == 1 and f"port {nobody}" in probe.stderr
        # and both work: a job on each
        c = JobClient(redis_server.client(), _settings(redis_server))
        jids = [c.submit(JobSpec(prompt=f"j{i}", owner="o", steps=2, seed=i)) for i in range(4)]
        assert all(c.wait(j, "o", 60)["status"] == "succeeded" for j in jids)
        assert all(w.alive() for w in ws)
    finally:
        for w in ws:
            w.stop()


def _settings(redis_server):
    from latentd.config.settings import Settings

    return Settings(redis_url=redis_server.url)


def test_supervisor_runs_one_worker_per_device_and_stops_them(redis_server, tiny_model):
    base = free_port()
    sup = WorkerProc(redis_server.url, str(tiny_model), args=("--devices", "cpu,cpu"),
                     worker_metrics_port=base, worker_grace_s=0.5, **FAST)
    names = [f"{sup.name}-0", f"{sup.name}-1"]
    r = redis_server.client()
    pids: list[int] = []
    try:
        sup.start()
        infos = wait_workers(r, names)
        pids = [int(infos[n]["pid"]) for n in names]
        assert sup.proc.pid not in pids and len(set(pids)) == 2
        assert [infos[n]["device"] for n in names] == ["cpu", "cpu"]
        if len(os.sched_getaffinity(0)) >= 2:        # two CPU workers: disjoint shares of the cores
            a, b = (os.sched_getaffinity(p) for p in pids)
            assert a and b and not a & b, (a, b)
        ports = [int(infos[n]["metrics_port"]) for n in names]
        assert ports[0] == base and ports[1] >= base + 1, ports     # base + device index (or next free)
        for p in ports:
            assert "latentd_worker_images_generated_total" in scrape(p)
        # a long job on one of them, then SIGTERM to the supervisor: handed back, nothing lost
        c = JobClient(r, _settings(redis_server))
        jid = c.submit(JobSpec(prompt="long", owner="o", steps=150))
        wait_status(c, jid, "o", ("running",))
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(60) == 0, sup.output()
        assert c.get(jid, "o")["status"] == "queued"
        rec = {k.decode(): v.decode() for k, v in r.hgetall(keys.job(jid)).items()}
        assert rec["graceful"] == "1"
        assert not any(r.exists(keys.worker(n)) for n in names)     # both deregistered
        for pid in pids:
            assert not _alive(pid), f"worker pid {pid} outlived its supervisor"
    finally:
        sup.stop()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_supervisor_restarts_a_crashed_worker(redis_server, tiny_model):
    sup = WorkerProc(redis_server.url, str(tiny_model), args=("--devices", "cpu"),
                     worker_grace_s=0.5, **FAST)
    name = f"{sup.name}-0"
    r = redis_server.client()
    pids: list[int] = []
    try:
        sup.start()
        first = int(wait_workers(r, [name])[name]["pid"])
        pids.append(first)
        os.kill(first, signal.SIGKILL)                              # a crash (OOM kill, driver)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = r.hgetall(keys.worker(name))
            if info and int(info[b"pid"]) != first and info.get(b"state") in (b"ready", b"busy"):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"not restarted:\n{sup.output()}")
        pids.append(int(info[b"pid"]))
        assert sup.alive()
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(60) == 0, sup.output()
    finally:
        sup.stop()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_supervisor_with_bad_devices_exits_2(redis_server):
    sup = WorkerProc(redis_server.url, None, args=("--devices", "gpu0"))
    try:
        assert sup.start().proc.wait(60) == 2
        assert "--devices" in sup.output()
    finally:
        sup.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
