"""Leases, heartbeats and the reaper: how a job held by a SIGKILLed worker comes back.

RQ alone would not do it: it moves abandoned jobs to its failed registry, finds them
only in a 600 s maintenance pass, and SimpleWorker sets the started-registry expiry once with no
heartbeat. So:

- Every running job has a lease: its score in the `latentd:<q>:leases` zset (an expiry time).
  A `Heartbeat` thread in each worker refreshes the leases of the jobs it holds every
  lease_s / 3 (fenced by attempt: a job that was requeued meanwhile is not revived) and the
  worker's own heartbeat (zset + info hash with a TTL, what /readyz reads). It runs beside the
  main loop, so a long batched U-Net call does not let leases lapse; a main loop that has made no
  progress for `stall_s` stops being vouched for, and its leases expire like a dead worker's.
- The same thread runs the reaper every reap_interval_s in every worker: one Lua call (cheap:
  a ZRANGEBYSCORE that is empty in the normal case) that requeues jobs whose lease expired, at
  the queue FRONT (they were admitted earlier), or fails them with code `worker_lost` once
  `max_attempts` claims died; it also returns a dead worker's inbox to the queue.
  Bound: a job is back in the queue at most lease_s + reap_interval_s after its worker died
  (defaults 15 + 5 = 20 s), as long as any worker is alive; a (re)started worker reaps at once.
- After a Redis outage, leases could look expired only because nobody could refresh them: a
  worker that lost its connection reaps again only after a full lease_s connected, and nobody
  reaps while Redis's own uptime is under lease_s; by then every live worker has refreshed.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import astuple

import redis as redis_lib

from latentd.jobs import keys
from latentd.jobs.jobstore import JobStore, Touch

log = logging.getLogger("latentd.worker")
REDIS_ERRORS = (redis_lib.exceptions.ConnectionError, redis_lib.exceptions.TimeoutError,
                redis_lib.exceptions.BusyLoadingError)


def connect(url: str) -> redis_lib.Redis:
    """A client that fails fast (and is retried by our loops) rather than hanging on a dead Redis.
    A `redis+sentinel://` URL (config/redis_url.py) gives a client that asks the sentinels for
    the master on every new connection, so after a failover the loops' next retry reaches the
    promoted replica."""
    from latentd.config.redis_url import sync_client

    return sync_client(url, socket_timeout=10, socket_connect_timeout=3, health_check_interval=15)


class Heartbeat(threading.Thread):
    """Refreshes leases + worker heartbeat and runs the reaper, on its own Redis connection."""

    def __init__(self, settings, name: str, held, stall_s: float):
        super().__init__(name="latentd-heartbeat", daemon=True)
        self.settings = settings
        self.worker_name = name
        self.held = held                 # callable -> list[(job_id, attempt)] (thread-safe snapshot)
        self.stall_s = stall_s
        self.info: dict = {"name": name, "pid": os.getpid(), "host": socket.gethostname(),
                           "state": "loading", "started_at": repr(time.time()), "running": 0}
        self.last_progress = time.monotonic()   # set by the main loop each tick
        self.stop_event = threading.Event()
        self.connected_since: float | None = None
        self.had_outage = False
        self.rq_worker = None
        self.next_reap = 0.0
        self.reaped = [0, 0, 0]
        self.lost: set[str] = set()      # job ids no longer ours, for the main loop
        self._lock = threading.Lock()
        self.redis = connect(settings.redis_url)
        self.jobs = JobStore(self.redis, settings.queue_name, settings.result_ttl_s)
        self.interval = max(0.2, min(settings.lease_s / 3.0, settings.worker_heartbeat_s))

    def set_info(self, **fields) -> None:
        with self._lock:
            self.info.update(fields)

    def pop_lost(self) -> set[str]:
        with self._lock:
            lost, self.lost = self.lost, set()
        return lost

    def beat(self) -> None:
        """One heartbeat; raises redis errors (run() backs off)."""
        s = self.settings
        now = time.time()
        stalled = time.monotonic() - self.last_progress > self.stall_s
        held = [] if stalled else list(self.held())
        with self._lock:
            info = dict(self.info, state="stalled" if stalled else self.info["state"],
                        heartbeat_at=repr(now))
        ttl = max(1, int(3 * self.interval + 1))
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.worker(self.worker_name), mapping={k: str(v) for k, v in info.items()})
        pipe.expire(keys.worker(self.worker_name), ttl)
        self.jobs.touch_on(pipe, self.worker_name, s.lease_s, 3 * self.interval,
                           [Touch(j, a, {}) for j, a in held], now=now)
        if self.rq_worker is not None:
            self.rq_worker.heartbeat(ttl, pipeline=pipe)
            self.rq_worker.set_state("busy" if info["state"] == "busy" else "idle", pipeline=pipe)
        lost = JobStore.lost_ids(pipe.execute()[2])     # hset, expire, touch, (rq heartbeat)
        if self.connected_since is None:
            self.connected_since = time.monotonic()
            self.register_rq_worker()
        if lost:
            with self._lock:
                self.lost.update(lost)
        if time.monotonic() >= self.next_reap and self.may_reap():
            self.next_reap = time.monotonic() + s.reap_interval_s
            requeued, failed, dead = astuple(self.jobs.reap(s.max_attempts, now=now))
            if requeued or failed or dead:
                log.warning("reaper: requeued %d job(s), failed %d, cleared %d dead worker(s)",
                            requeued, failed, dead)
                from latentd.worker import metrics

                metrics.REQUEUED.labels(why="lease_expired").inc(requeued)
                metrics.FAILURES.labels(reason="worker_lost").inc(failed)
            for i, v in enumerate((requeued, failed, dead)):
                self.reaped[i] += v

    def register_rq_worker(self) -> None:
        """Also appear as an RQ worker (`rq info` lists it), kept alive by our heartbeat. It is
        only a registration: RQ's SimpleWorker never runs our jobs."""
        from rq import Queue, SimpleWorker
        from rq.serializers import JSONSerializer

        if self.rq_worker is None:
            q = Queue(self.settings.queue_name, connection=self.redis, serializer=JSONSerializer)
            self.rq_worker = SimpleWorker([q], connection=self.redis, name=self.worker_name,
                                          serializer=JSONSerializer)
        try:
            self.rq_worker.register_birth()
        except ValueError:
            pass   # still registered (Redis kept it across our reconnect)

    def may_reap(self) -> bool:
        """Not right after an outage: leases may look expired only because no one could refresh
        them. After this worker lost Redis it waits a full lease_s of connection; and nobody reaps
        while Redis itself has been up for less than lease_s (it restarted)."""
        lease = self.settings.lease_s
        if self.had_outage and time.monotonic() - self.connected_since < lease:
            return False
        return int(self.redis.info("server").get("uptime_in_seconds", 0)) >= lease

    def run(self) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            try:
                self.beat()
                backoff = 0.5
                self.stop_event.wait(self.interval)
            except REDIS_ERRORS as e:
                self.connected_since = None
                self.had_outage = True
                log.warning("heartbeat: Redis unavailable (%s); retrying in %.1fs", e, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any one bad beat
                log.exception("heartbeat failed")
                self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        try:
            q = self.settings.queue_name
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(keys.workers(q), self.worker_name)
            pipe.delete(keys.worker(self.worker_name))
            while self.redis.lmove(keys.inbox(self.worker_name), keys.rq_queue(q), "RIGHT", "LEFT"):
                pass
            pipe.execute()
            if self.rq_worker is not None:
                self.rq_worker.register_death()
        except REDIS_ERRORS:
            pass
