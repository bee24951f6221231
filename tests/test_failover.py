"""Redis failover under load, with real processes: a master, a replica and three sentinels
(devkit/sentinel.py), the API and a worker both on `redis+sentinel://`, admission waiting for
the replica (LATENTD_REDIS_MIN_REPLICAS=1).

A client submits jobs at a steady rate, each with its own Idempotency-Key, and retries a 503
with the same key. The master is SIGKILLed; Sentinel promotes the replica; the old master comes
back as a replica of the new one. Meanwhile the API answers 503 with Retry-After, never a 500;
the worker reconnects and carries on; every job whose admission was acknowledged (202) completes,
none is lost and no logical request runs twice. Prints acknowledged / completed / lost /
duplicated and the API's unavailability window.
"""
from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest

from devkit.api_proc import ALICE, KEYS, ApiProc
from devkit.sentinel import SentinelGroup
from devkit.services import FAST, WorkerProc
from latentd.config.redis_url import sync_client
from latentd.jobs import keys

RATE = 5.0              # submissions per second
BEFORE_S = 3.0          # load before the kill
AFTER_OK_S = 3.0        # load kept up once the API admits again
DEADLINE_S = 60.0


@pytest.fixture
def replicated(tiny_model):
    group = SentinelGroup(down_after_ms=1000, failover_timeout_ms=3000).start()
    api = worker = None
    try:
        settings = dict(redis_min_replicas=1, redis_wait_ms=300)
        api = ApiProc(group.url, api_keys=KEYS, model=str(tiny_model), rate_limit_per_s=0,
                      **settings).start()
        worker = WorkerProc(group.url, str(tiny_model), **FAST, **settings).start()
        r = sync_client(group.url, socket_timeout=1)
        deadline = time.monotonic() + 180
        while r.hget(keys.worker(worker.name), "state") not in (b"ready", b"busy"):
            assert worker.alive() and time.monotonic() < deadline, worker.output()
            time.sleep(0.1)
        yield group, api, worker
    finally:
        if worker:
            worker.stop()
        if api:
            api.stop()
        group.stop()


class Load(threading.Thread):
    """A new logical request every 1/RATE s, each on its own thread, which retries a 503 with the
    same Idempotency-Key every RETRY_S (any other answer ends it)."""

    RETRY_S = 0.1

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.halt = threading.Event()
        self.log: list[tuple[float, int, bool]] = []      # (sent at, status, has Retry-After)
        self.acked: dict[str, str] = {}                   # logical request -> job id
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def one(self, req: str, deadline: float):
        body = {"prompt": f"failover {req}", "size": "64x64", "steps": 2}
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ALICE}"},
                          timeout=10) as c:
            while time.monotonic() < deadline:
                t = time.monotonic()
                try:
                    resp = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": req})
                    status, ra = resp.status_code, "retry-after" in resp.headers
                except httpx.HTTPError:
                    status, ra = 0, False
                with self.lock:
                    self.log.append((t, status, ra))
                    if status in (200, 202):
                        self.acked[req] = resp.json()["id"]
                if status not in (503, 0):
                    return
                threading.Event().wait(self.RETRY_S)

    def run(self):
        while not self.halt.is_set():
            th = threading.Thread(target=self.one, args=(uuid.uuid4().hex[:12], time.monotonic() + DEADLINE_S),
                                  daemon=True)
            th.start()
            self.threads.append(th)
            self.halt.wait(1.0 / RATE)

    def finish(self):
        self.halt.set()
        self.join()
        for th in self.threads:
            th.join(DEADLINE_S)
        return not any(th.is_alive() for th in self.threads)


def test_sigkill_master_under_load(replicated):
    group, api, worker = replicated
    load = Load(api.url)
    load.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < BEFORE_S:       # steady load, then the kill
        threading.Event().wait(0.1)
    old = group.name_of(group.master_port())
    killed_at = time.monotonic()
    group.kill(old)
    new = group.wait_promoted(old)
    promoted_at = time.monotonic()
    group.restart(old, replica_of=new)             # the old master returns as a replica
    group.wait_replica(new)
    replica_at = time.monotonic()
    # keep the load up until the API has admitted for AFTER_OK_S
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        ok_after = [t for t, s, _ in load.log if t > replica_at and s in (200, 202)]
        if ok_after and time.monotonic() - ok_after[0] >= AFTER_OK_S:
            break
        threading.Event().wait(0.1)
    assert load.finish()

    codes = [s for _, s, _ in load.log]
    assert all(s in (200, 202, 503) for s in codes), sorted(set(codes))
    assert all(ra for _, s, ra in load.log if s == 503)
    refused = [t for t, s, _ in load.log if t > killed_at and s not in (200, 202)]
    first_ok = min((t for t, s, _ in load.log if t > killed_at and s in (200, 202)), default=None)
    assert first_ok is not None
    last_ok = max((t for t, s, _ in load.log if t < killed_at and s in (200, 202)), default=killed_at)

    # every acknowledged job completes, exactly once per logical request
    r = sync_client(group.url, socket_timeout=2)
    ids = set(load.acked.values())
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        st = {j: r.hget(keys.job(j), "status") for j in ids}
        if all(v in (b"succeeded", b"failed", b"canceled") for v in st.values() if v is not None) \
                and None not in st.values():
            break
        time.sleep(0.1)
    st = {j: (r.hget(keys.job(j), "status") or b"missing").decode() for j in ids}
    completed = sum(v == "succeeded" for v in st.values())
    lost = [j for j, v in st.items() if v != "succeeded"]
    per_request: dict[str, int] = {}
    for k in r.scan_iter(match="latentd:job:*", count=1000):
        rec = r.hmget(k, "spec", "status")
        if rec[1] == b"succeeded":
            prompt = json.loads(rec[0])["prompt"]
            per_request[prompt] = per_request.get(prompt, 0) + 1
    duplicated = sum(n - 1 for n in per_request.values() if n > 1)
    print(f"\nfailover: acknowledged={len(ids)} completed={completed} lost={len(lost)} "
          f"duplicated={duplicated} requests={len(load.log)} 503s={codes.count(503)} 500s={codes.count(500)}"
          f"\n  kill -> promoted {promoted_at - killed_at:.2f}s, -> replica back {replica_at - killed_at:.2f}s; "
          f"API unavailable: kill -> first 2xx {first_ok - killed_at:.2f}s "
          f"(last 2xx before -> first after {first_ok - last_ok:.2f}s), "
          f"refusals after the kill {len(refused)}; worker alive={worker.alive()}")
    assert len(ids) == len(load.acked) >= RATE * BEFORE_S * 0.5
    assert not lost, {j: st[j] for j in lost}
    assert duplicated == 0
    assert worker.alive()
