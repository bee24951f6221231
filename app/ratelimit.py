"""Per-key token bucket in Redis, atomic across API replicas, clock from Redis TIME so replicas
agree: checked inside the admission's own script (jobs/state.py ADMIT, the same bucket and
arithmetic as LUA here), or for a key with a quota by ONE call of LUA before the quota's count.
A bucket holds `burst` tokens and refills at `rate` per second; a request costs one token per
image. Over the limit: 429 with Retry-After (seconds until enough tokens are back).
"""
from __future__ import annotations

import math

from latentd.jobs import keys

# KEYS[1]: bucket hash {t: tokens, ts: ms}; ARGV: rate (tokens/s), burst, cost.
# Returns {allowed (0|1), wait_ms}.
LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then tokens = burst; ts = now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
"""


class RateLimiter:
    def __init__(self, redis, rate_per_s: float, burst: int):
        self.rate, self.burst = float(rate_per_s), max(1, int(burst))
        self._script = redis.register_script(LUA) if self.rate > 0 else None

    def take(self, owner: str, cost: int = 1) -> float:
        """0.0 when admitted, else the seconds to wait before retrying."""
        if self._script is None:
            return 0.0
        cost = min(max(1, cost), self.burst)
        allowed, wait_ms = self._script(keys=[keys.ratelimit(owner)],
                                        args=[self.rate, self.burst, cost])
        return 0.0 if int(allowed) else max(0.001, int(wait_ms) / 1000)

    def args(self, cost: int = 1) -> tuple[float, int, int] | None:
        """(rate, burst, cost) for the same bucket checked inside the admission script
        (JobClient.submit rate=, jobs/state.py ADMIT); None when there is no rate limit."""
        if self._script is None:
            return None
        return self.rate, self.burst, min(max(1, cost), self.burst)

    @staticmethod
    def retry_after(wait_s: float) -> str:
        return str(max(1, math.ceil(wait_s)))
