"""JobClient against a real redis-server: capped atomic submit, owner checks, cancel, wait, and the
RQ view of our jobs (JSON serializer, RQ's own key names)."""
from __future__ import annotations

import json
import threading
import time

import pytest
from pydantic import ValidationError

from latentd.config.settings import Settings
from latentd.jobs import keys
from latentd.jobs.client import JobClient, QueueFull
from latentd.jobs.jobstore import ImageResult, JobStore, Reaped
from latentd.jobs.spec import JobSpec


def make_client(redis_server, **over):
    s = Settings(redis_url=redis_server.url, queue_name="q", **over)
    return JobClient(redis_server.client(), s)


def test_keys_match_rq(redis_server):
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    q = Queue("q", connection=redis_server.client(), serializer=JSONSerializer)
    assert q.key == keys.rq_queue("q")
    assert q.started_job_registry.key == keys.rq_started("q")
    assert Job.key_for("abc") == keys.rq_job("abc")
    assert Queue.redis_queues_keys == keys.RQ_QUEUES


def test_submit_is_json_rq_job_and_record(redis_server):
    from rq import Queue
    from rq.serializers import JSONSerializer

    c = make_client(redis_server)
    jid = c.submit(JobSpec(prompt="a red cat", owner="alice", n=3, steps=4, seed=10))
    r = redis_server.client()
    # nothing pickled: the RQ job's data is JSON (compressed by RQ) of our spec
    q = Queue("q", connection=r, serializer=JSONSerializer)
    assert q.job_ids == [jid]
    job = q.fetch_job(jid)
    assert job.get_status() == "queued"
    assert job.args[0]["prompt"] == "a red cat" and job.args[0]["seed"] == 10
    d = c.get(jid, "alice")
    assert d["status"] == "queued" and d["queue_position"] == 0
    assert d["progress"] == {"step": 0, "total": 12, "parked": False}
    assert d["params"]["seed"] == 10 and "owner" not in d["params"]
    assert c.get(jid, "bob") is None
    assert c.get("../../etc/passwd", "alice") is None
    assert c.image_bytes(jid, 0, "alice") is None


def test_random_seed_is_fixed_at_submit(redis_server):
    c = make_client(redis_server)
    jid = c.submit(JobSpec(prompt="x", owner="a", n=2))
    seed = c.get(jid, "a")["params"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**63 - 2


def test_queue_cap_rejects_and_enqueues_nothing(redis_server):
    c = make_client(redis_server, queue_cap=3)
    for _ in range(3):
        c.submit(JobSpec(prompt="x", owner="a"))
    before = set(redis_server.client().keys("*"))
    with pytest.raises(QueueFull):
        c.submit(JobSpec(prompt="x", owner="a"))
    assert c.queue_depth() == 3
    assert set(redis_server.client().keys("*")) == before   # no job hash, no record left behind


def test_queue_cap_holds_under_concurrent_submits(redis_server):
    cap = 25
    c = make_client(redis_server, queue_cap=cap)
    accepted, rejected = [], []

    def hammer():
        cl = make_client(redis_server, queue_cap=cap)
        for _ in range(20):
            try:
                accepted.append(cl.submit(JobSpec(prompt="x", owner="a")))
            except QueueFull:
                rejected.append(1)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(accepted) == cap and len(rejected) == 160 - cap
    assert c.queue_depth() == cap
    assert len(redis_server.client().keys("latentd:job:*")) == cap


def test_cancel_queued_owner_only(redis_server):
    c = make_client(redis_server)
    a = c.submit(JobSpec(prompt="x", owner="alice"))
    b = c.submit(JobSpec(prompt="y", owner="alice"))
    assert c.cancel(a, "bob") is None
    assert c.get(a, "alice")["status"] == "queued"
    d = c.cancel(a, "alice")
    assert d["status"] == "canceled" and d["error"]["code"] == "canceled"
    assert c.queue_depth() == 1 and c.get(b, "alice")["queue_position"] == 0
    assert c.cancel(a, "alice")["status"] == "canceled"   # idempotent, ends once
    assert redis_server.client().hget(keys.rq_job(a), "status") == b"canceled"
    assert redis_server.client().ttl(keys.job(a)) > 0


def test_wait_wakes_on_completion_and_times_out(redis_server):
    c = make_client(redis_server)
    jid = c.submit(JobSpec(prompt="x", owner="alice"))
    assert c.wait(jid, "alice", 0.3)["status"] == "queued"     # the timeout returns the live record
    # woken by the job's pub/sub message: the wait (timeout 600 s) returns once the cancel lands
    got = []
    waiter = threading.Thread(target=lambda: got.append(c.wait(jid, "alice", 600)), daemon=True)
    waiter.start()
    c.cancel(jid, "alice")
    waiter.join(120)
    assert not waiter.is_alive() and got[0]["status"] == "canceled"
    assert c.wait(jid, "bob", 1) is None


def store(redis_server) -> JobStore:
    return JobStore(redis_server.client(), "q", 60)


def test_claims_take_turns_across_owners(redis_server):
    """A flood from one key does not starve another: claims rotate over owners, FIFO within."""
    c = make_client(redis_server)
    sc = store(redis_server)
    flood = [c.submit(JobSpec(prompt="a", owner="flood")) for _ in range(20)]
    other = [c.submit(JobSpec(prompt="b", owner="other")) for _ in range(2)]
    got = [sc.claim("w", 60).job_id for _ in range(5)]
    assert got == [flood[0], other[0], flood[1], other[1], flood[2]]
    assert c.queue_depth() == 17
    r = redis_server.client()
    assert r.lrange(keys.owners("q"), 0, -1) == [b"flood"]
    # a canceled queued job is skipped; the rest still come out in order
    c.cancel(flood[3], "flood")
    assert sc.claim("w", 60).job_id == flood[4]


def test_dead_worker_inbox_goes_back(redis_server):
    """An id a worker moved into its inbox (blocking pop) but never claimed is not lost."""
    c = make_client(redis_server)
    r = redis_server.client()
    sc = store(redis_server)
    jid = c.submit(JobSpec(prompt="x", owner="a"))
    assert r.blmove(keys.rq_queue("q"), keys.inbox("ghost"), 1, "LEFT", "RIGHT") == jid.encode()
    r.zadd(keys.workers("q"), {"ghost": time.time() - 1})      # its heartbeat expired
    assert sc.reap(3) == Reaped(requeued=0, failed=0, dead_workers=1)
    assert r.lrange(keys.rq_queue("q"), 0, -1) == [jid.encode()]
    assert sc.claim("w2", 60).job_id == jid
    assert sc.claim("w2", 60) is None                              # once


def test_claim_fences_a_stale_attempt(redis_server):
    """Two claims of one job (a requeue in between): only the newer attempt may write."""
    c = make_client(redis_server)
    r = redis_server.client()
    sc = store(redis_server)
    jid = c.submit(JobSpec(prompt="x", owner="a", n=1, steps=2))
    got = sc.claim("w1", 0.01)
    assert got.job_id == jid and got.attempt == 1
    assert r.zcard(keys.rq_started("q")) == 1
    time.sleep(0.05)
    assert sc.reap(3).requeued == 1 and c.get(jid, "a")["status"] == "queued"
    assert redis_server.client().lrange(keys.wait("q", "a"), 0, -1) == [jid.encode()]
    assert r.zcard(keys.rq_started("q")) == 0
    got2 = sc.claim("w2", 60)
    assert got2.attempt == 2
    img = json.dumps({"index": 0, "seed": 1, "nsfw": False})
    assert sc.record_image(jid, 1, 0, img, 0.5, 2) is ImageResult.NOT_OURS     # stale worker refused
    assert sc.record_image(jid, 2, 0, img, 0.5, 2) is ImageResult.SUCCEEDED    # recorded, job succeeded
    assert sc.record_image(jid, 2, 0, img, 0.5, 2) is ImageResult.NOT_OURS     # ends once
    d = c.get(jid, "a")
    assert d["status"] == "succeeded" and len(d["images"]) == 1 and d["usage"]["compute_seconds"] == 0.5
    assert r.zcard(keys.leases("q")) == 0


def test_spec_validation():
    with pytest.raises(ValidationError):
        JobSpec(prompt="x", owner="a", n=0)
    with pytest.raises(ValidationError):
        JobSpec(prompt="x", owner="a", guidance_scale=float("nan"))
    with pytest.raises(ValidationError):
        JobSpec(prompt="x", owner="a", seed=2**63 - 1, n=2)
    with pytest.raises(ValidationError):
        JobSpec(prompt="x", owner="a", steps="4")
    with pytest.raises(ValidationError):
        JobSpec(prompt="x", owner="a", bogus=1)
    s = JobSpec(prompt="x", owner="a", n=2, seed=5)
    assert JobSpec.from_json(s.to_json()) == s
    assert [s.image_request_kwargs(k)["seed"] for k in range(s.n)] == [5, 6]


def test_job_spec_carries_every_resolved_field():
    """JobSpec is Resolved's wire form: both are derived from the declaration's "spec" fields."""
    from dataclasses import fields

    from latentd.jobs.request_resolve import Resolved

    assert {f.name for f in fields(Resolved)} <= set(JobSpec.model_fields)


def test_rq_job_hash_is_what_rq_writes(redis_server):
    """submit() builds RQ's job hash itself (cheaper than rq.job.Job): the same fields as RQ's own
    to_dict(), and RQ reads the job back (function, args, status, timeouts)."""
    import json
    import zlib

    from rq.job import Job
    from rq.serializers import JSONSerializer

    from latentd.jobs.client import RQ_FUNC, rq_job_fields
    from latentd.jobs.state import rq_time

    spec = JobSpec(prompt="a red cat", owner="alice", n=2, steps=4, seed=10)
    r = redis_server.client()
    ours = rq_job_fields("abc", "q", spec.to_json(), rq_time(), 601, 3600, "latentd job abc (2 image(s))")
    job = Job.create(RQ_FUNC, args=[json.loads(spec.to_json())], connection=r, id="abc", origin="q",
                     serializer=JSONSerializer, timeout=601, result_ttl=3600,
                     description="latentd job abc (2 image(s))")
    job.enqueued_at = job.created_at
    job._status = "queued"
    theirs = job.to_dict()
    assert set(ours) == set(theirs)
    for k in set(ours) - {"data", "created_at", "enqueued_at"}:
        assert str(ours[k]) == str(theirs[k]), k
    assert json.loads(zlib.decompress(ours["data"])) == json.loads(zlib.decompress(theirs["data"]))
    c = make_client(redis_server)
    jid = c.submit(spec)
    got = Job.fetch(jid, connection=r, serializer=JSONSerializer)
    assert got.func_name == RQ_FUNC and got.args[0]["prompt"] == "a red cat" and got.kwargs == {}
    assert got.get_status() == "queued" and got.timeout == int(spec.timeout_s or c.settings.job_timeout_s) + 1
    assert got.origin == "q" and got.result_ttl == c.settings.result_ttl_s
    assert abs((got.created_at - got.enqueued_at).total_seconds()) < 1e-6
