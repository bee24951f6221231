"""SIGTERM on a real worker process (a scale-down, a rollout, a node drain): it finishes its batch
within LATENTD_WORKER_GRACE_S, or hands every held job back to the queue front, so
another worker runs them and nothing is lost or run twice. (tests/test_worker_loop.py covers one
job handed back; this is the whole batch and the finish-in-time case.)"""
from __future__ import annotations

import time

from devkit.services import wait_status
from devkit.services import assert_exactly_once
from latentd.jobs import keys
from latentd.jobs.spec import JobSpec


def test_sigterm_hands_back_the_whole_batch(stack):
    a = stack.start(worker_max_batch=4, worker_grace_s=0.5)
    c = stack.client()
    jids = [c.submit(JobSpec(prompt=f"long {i}", owner="o", steps=150, seed=i)) for i in range(3)]
    for j in jids:
        wait_status(c, j, "o", ("running",))             # all three share the batch
    assert {stack.record(j)["worker"] for j in jids} == {a.name}
    assert a.terminate(30) == 0, a.output()
    r = stack.redis.client()
    assert [c.get(j, "o")["status"] for j in jids] == ["queued"] * 3
    assert all(stack.record(j)["graceful"] == "1" for j in jids)
    assert sorted(r.lrange(keys.rq_queue("latentd"), 0, -1)) == sorted(j.encode() for j in jids)
    assert r.zcard(keys.leases("latentd")) == 0 and r.zcard(keys.rq_started("latentd")) == 0
    assert "handed back" in a.output()
    # another worker (a scale-down keeps at least one) picks them up and runs each exactly once;
    # graceful hand-backs do not count against max_attempts
    b = stack.start(worker_max_batch=4, max_attempts=1)
    for j in jids:
        d = c.wait(j, "o", 180)
        assert d["status"] == "succeeded", (d, b.output())
        rec = stack.record(j)
        assert rec["worker"] == b.name and rec["attempt"] == "2"
    assert_exactly_once(stack, jids)


def test_sigterm_finishes_work_within_the_grace_period(stack):
    import signal

    a = stack.start(worker_max_batch=4, worker_grace_s=60)
    c = stack.client()
    jids = [c.submit(JobSpec(prompt=f"batch {i}", owner="o", steps=150, seed=i)) for i in range(2)]
    for j in jids:
        wait_status(c, j, "o", ("running",))
    t = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)                                     # the worker has seen it: stops claiming
    queued_after = c.submit(JobSpec(prompt="not claimed", owner="o", steps=2))
    assert a.proc.wait(90) == 0, a.output()
    print(f"stopped {time.monotonic() - t:.2f}s after SIGTERM")
    for j in jids:
        d = c.get(j, "o")
        assert d["status"] == "succeeded", d                    # finished, not handed back
        assert stack.record(j).get("graceful") is None
    # a stopping worker claims nothing new: the later job is still queued for someone else
    assert c.get(queued_after, "o")["status"] == "queued"
    assert stack.record(queued_after)["attempt"] == "0"
    assert not stack.redis.client().exists(keys.worker(a.name))
