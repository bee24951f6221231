"""Crashes and restarts: SIGKILLed workers and a SIGKILLed Redis lose no admitted job,
and no image is stored twice. Small leases (3 s) keep it fast; the bound is lease + reap interval.
"""
from __future__ import annotations

import random
import time

from devkit.services import FAST, assert_exactly_once, wait_status
from latentd.jobs import keys
from latentd.jobs.spec import JobSpec
from latentd.jobs.state import TERMINAL

Q = "latentd"


def test_sigkill_mid_run_requeued_within_lease_bound(stack):
    a = stack.start()
    c = stack.client()
    jid = c.submit(JobSpec(prompt="long", owner="o", steps=150, n=2, seed=3))
    wait_status(c, jid, "o", ("running",))
    time.sleep(0.5)
    a.kill()
    killed = time.monotonic()
    b = stack.start()                      # a restarted worker (new name) picks it up
    deadline = killed + 60
    while int(stack.record(jid)["attempt"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    requeue_s = time.monotonic() - killed
    bound = FAST["lease_s"] + FAST["reap_interval_s"]
    print(f"requeued {requeue_s:.2f}s after SIGKILL (bound {bound}s + worker start)")
    rec = stack.record(jid)
    assert rec["attempt"] == "2" and rec["worker"] == b.name and rec["lost_worker"] == a.name
    d = c.wait(jid, "o", 120)
    assert d["status"] == "succeeded" and [i["seed"] for i in d["images"]] == [3, 4]
    assert_exactly_once(stack, [jid])


def test_reaper_bound_with_a_live_worker(stack):
    """With a second worker already up, the requeue happens within lease_s + reap_interval_s.
    The one timed assertion kept in the suite, on purpose: the bound is a promise of the service
    (docs/CONTRACTS.md §2, how leases and the reaper bound a lost job's requeue), not a speed."""
    a = stack.start(worker_max_batch=1)
    stack.start(worker_max_batch=1)                   # the survivor that reclaims the job
    c = stack.client()
    j1 = c.submit(JobSpec(prompt="one", owner="o", steps=150))
    j2 = c.submit(JobSpec(prompt="two", owner="o", steps=150))
    wait_status(c, j1, "o", ("running",)), wait_status(c, j2, "o", ("running",))
    jid = j1 if stack.record(j1)["worker"] == a.name else j2     # the job `a` holds
    c.cancel(j2 if jid == j1 else j1, "o")            # free the survivor `b`
    victim = a
    victim.kill()
    killed = time.monotonic()
    while int(stack.record(jid)["attempt"]) < 2 and time.monotonic() < killed + 60:
        time.sleep(0.05)
    took = time.monotonic() - killed
    print(f"requeue + reclaim {took:.2f}s after SIGKILL (lease {FAST['lease_s']}s, reap {FAST['reap_interval_s']}s)")
    assert took <= FAST["lease_s"] + FAST["reap_interval_s"] + 2.0
    assert c.wait(jid, "o", 120)["status"] == "succeeded"


def test_max_attempts_fails_with_reason(stack):
    a = stack.start(max_attempts=1)
    c = stack.client()
    jid = c.submit(JobSpec(prompt="doomed", owner="o", steps=150))
    wait_status(c, jid, "o", ("running",))
    a.kill()
    stack.start(max_attempts=1)
    d = c.wait(jid, "o", 60)
    assert d["status"] == "failed" and d["error"]["code"] == "worker_lost", d
    assert_exactly_once(stack, [jid])


def test_three_rounds_of_sigkill_lose_and_duplicate_nothing(stack):
    """Two workers, 30 jobs, three rounds of SIGKILL at random moments."""
    rng = random.Random(6)
    settings = dict(worker_max_batch=4, max_attempts=10)
    workers = [stack.start(**settings), stack.start(**settings)]
    c = stack.client()
    jids = [c.submit(JobSpec(prompt=f"job {i}", owner="o", steps=rng.choice([4, 8, 16]),
                             n=rng.choice([1, 2]), seed=i * 10)) for i in range(30)]
    for _ in range(3):
        time.sleep(rng.uniform(0.2, 2.0))
        i = rng.randrange(2)
        workers[i].kill()
        workers[i] = stack.start(**settings)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if all(c.get(j, "o")["status"] in TERMINAL for j in jids):
            break
        time.sleep(0.2)
    statuses = assert_exactly_once(stack, jids)
    attempts = [int(stack.record(j)["attempt"]) for j in jids]
    print(f"statuses: { {s: list(statuses.values()).count(s) for s in set(statuses.values())} }, "
          f"re-run jobs: {sum(a > 1 for a in attempts)}")
    assert set(statuses.values()) == {"succeeded"}


def test_redis_sigkill_and_restart(stack):
    w = stack.start()
    c = stack.client()
    jids = [c.submit(JobSpec(prompt=f"j{i}", owner="o", steps=40, seed=i)) for i in range(6)]
    time.sleep(1.5)                               # admitted at least a second before the crash
    stack.redis.kill()
    time.sleep(1.0)
    stack.redis.start()                           # same port, same dir: replays the AOF
    c = stack.client()
    after = c.submit(JobSpec(prompt="after", owner="o", steps=2))
    for j in jids + [after]:
        d = c.wait(j, "o", 120)
        assert d is not None and d["status"] == "succeeded", (j, d, w.output())
    assert w.alive()
    assert_exactly_once(stack, jids + [after])
    # heartbeat back after reconnecting (its retry backs off up to 5 s, so allow a few beats)
    deadline = time.monotonic() + 20
    while not c.ready_workers() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert c.ready_workers(), w.output()


def _claimed_job(redis_server, worker="hb", lease_s=60.0):
    from latentd.config.settings import Settings
    from latentd.jobs.client import JobClient
    from latentd.jobs.jobstore import JobStore

    s = Settings(redis_url=redis_server.url, lease_s=lease_s, worker_heartbeat_s=0.2,
                 reap_interval_s=0.2)
    c = JobClient(redis_server.client(), s)
    jid = c.submit(JobSpec(prompt="x", owner="o"))
    got = JobStore(redis_server.client(), Q, s.result_ttl_s).claim(worker, 1.0)
    assert got.job_id == jid
    return s, jid


def test_heartbeat_refreshes_leases_until_the_loop_stalls(redis_server):
    """The heartbeat thread vouches for held jobs only while the main loop makes progress."""
    from latentd.worker.recovery import Heartbeat

    s, jid = _claimed_job(redis_server)
    r = redis_server.client()
    hb = Heartbeat(s, "hb", lambda: [(jid, 1)], stall_s=5.0)
    hb.beat()
    assert r.zscore(keys.leases(Q), jid) > time.time() + 50           # refreshed to now + lease_s
    assert r.hget(keys.worker("hb"), "state") == b"loading"
    r.zadd(keys.leases(Q), {jid: time.time() + 1})
    hb.last_progress = time.monotonic() - 10                          # main loop stuck
    hb.beat()
    assert r.zscore(keys.leases(Q), jid) < time.time() + 2            # not refreshed
    assert r.hget(keys.worker("hb"), "state") == b"stalled"


def test_heartbeat_reports_jobs_that_are_no_longer_ours(redis_server):
    from latentd.jobs.client import JobClient
    from latentd.worker.recovery import Heartbeat

    s, jid = _claimed_job(redis_server)
    JobClient(redis_server.client(), s).cancel(jid, "o")
    hb = Heartbeat(s, "hb", lambda: [(jid, 1)], stall_s=60)
    hb.beat()
    assert hb.pop_lost() == {jid} and hb.pop_lost() == set()
    assert redis_server.client().zscore(keys.leases(Q), jid) is None   # not revived


def test_no_reaping_while_redis_is_younger_than_a_lease(redis_server):
    """Right after a Redis restart every lease looks stale; nobody reaps until a lease has passed."""
    from latentd.worker.recovery import Heartbeat

    s, jid = _claimed_job(redis_server, lease_s=3600.0)
    hb = Heartbeat(s, "hb2", lambda: [], stall_s=60)
    redis_server.client().zadd(keys.leases(Q), {jid: time.time() - 1})   # expired
    assert hb.may_reap() is False
    hb.beat()
    assert stack_status(redis_server, jid) == "running"
    s2 = s.model_copy(update={"lease_s": 0.0})
    hb2 = Heartbeat(s2, "hb3", lambda: [], stall_s=60)
    hb2.beat()
    assert stack_status(redis_server, jid) == "queued"


def stack_status(redis_server, jid):
    return redis_server.client().hget(keys.job(jid), "status").decode()
