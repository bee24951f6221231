"""Idempotency-Key records in Redis (torch-free; the API uses it through app/idempotency.py).

One request per (owner, key) wins: `claim` is one Lua script that either reserves the key for a
new job id (state `pending`, a short TTL) or returns what the key already holds. The winner
admits its job with that id, and the same admission pipeline (JobClient.submit) marks the key
`admitted` and gives it its full TTL, so "the key names a job" and "the job exists" become true
together. A winner whose admission is refused (rate limit, queue full, Redis refusing writes,
replication timeout) `release`s the key, so a retry starts afresh; a process that dies between
claim and admission leaves a `pending` reservation that expires after PENDING_S.
"""
from __future__ import annotations

import hashlib
import time

from latentd.jobs import keys

PENDING_S = 30        # a reservation whose admission never completed is forgotten after this

# KEYS: the idempotency key   ARGV: job id, fingerprint, pending ms, now
# -> false (reserved for ARGV[1]) or {job_id, fp, state}
CLAIM = r"""
local v = redis.call('HMGET', KEYS[1], 'job_id', 'fp', 'state')
if v[1] then return v end
redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'fp', ARGV[2], 'state', 'pending', 'at', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return false
"""

# KEYS: the idempotency key   ARGV: job id   -> 1 deleted, 0 held by another job id
RELEASE = r"""
if redis.call('HGET', KEYS[1], 'job_id') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def key_hash(header_value: str) -> str:
    return hashlib.sha256(header_value.encode()).hexdigest()


class IdempotencyStore:
    def __init__(self, redis):
        self.redis = redis
        self._claim = redis.register_script(CLAIM)
        self._release = redis.register_script(RELEASE)

    def claim(self, owner: str, key: str, job_id: str, fp: str) -> tuple[str, str, str] | None:
        """None: the key is now reserved for `job_id`. Else (job id, fingerprint, state) of the
        request that holds it."""
        res = self._claim(keys=[keys.idempotency(owner, key_hash(key))],
                          args=[job_id, fp, int(PENDING_S * 1000), repr(time.time())])
        if not res:
            return None
        return tuple((x.decode() if isinstance(x, bytes) else (x or "")) for x in res)

    def release(self, owner: str, key: str, job_id: str) -> bool:
        return bool(self._release(keys=[keys.idempotency(owner, key_hash(key))], args=[job_id]))

    @staticmethod
    def confirm_on(pipe, owner: str, key: str, ttl_s: int) -> None:
        """Queue `admitted` + the full TTL on the admission pipeline (after the admission)."""
        k = keys.idempotency(owner, key_hash(key))
        pipe.hset(k, "state", "admitted")
        pipe.expire(k, max(1, int(ttl_s)))
