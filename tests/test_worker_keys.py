"""jobs/keys.py spells RQ's own keys so that our Lua scripts can touch them atomically; these
must stay what RQ itself computes (rq is pinned; this catches a change when it is bumped)."""
from __future__ import annotations

from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

from latentd.jobs import keys


def test_rq_keys_match_rq():
    import redis
    conn = redis.Redis()                 # never connected: key names are computed locally
    q = Queue("latentd", connection=conn)
    assert keys.rq_queue("latentd") == q.key
    assert keys.RQ_QUEUES == Queue.redis_queues_keys
    assert keys.rq_job("abc") == Job.key_for("abc")
    assert keys.rq_started("latentd") == StartedJobRegistry("latentd", connection=conn).key


def test_our_keys_live_under_the_prefix():
    names = [keys.job("j"), keys.image("j", 0)]
    assert all(n.startswith(keys.P + ":") for n in names)
