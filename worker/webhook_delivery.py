"""Webhook delivery: the threads in every worker that POST ended jobs' records (the records,
their signature and the allow-list are the job contract's: jobs/webhooks.py).

Delivery threads claim due entries atomically (the claim pushes the due time past the HTTP
timeout: a claimer that dies mid-POST is retried after that), POST, and on a non-2xx answer or a
connection error reschedule with exponential backoff until webhook_max_age_s after the job
ended; then the delivery is dropped and counted as gave_up. At least once: receivers deduplicate
by the Latentd-Webhook-Id header.
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request

from latentd.jobs import keys
from latentd.jobs.webhooks import (ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, body_of, secret_bytes, sign,
                                   url_problem)
from latentd.worker import metrics
from latentd.worker.recovery import connect

log = logging.getLogger("latentd.webhooks")

THREADS = 2                                            # delivery threads per worker
CLAIM_MARGIN_S = 5     # a claimed delivery is due again this long after its POST's timeout

# KEYS: due zset   ARGV: now, claimed-until -> false or {id, url, attempts, first_at, body}
CLAIM = r"""
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #ids == 0 then return false end
local id = ids[1]
local h = k_webhook(id)
redis.call('ZADD', KEYS[1], ARGV[2], id)
if redis.call('EXISTS', h) == 0 then
  redis.call('ZREM', KEYS[1], id)
  return {id, '', '0', '0', ''}
end
local r = redis.call('HMGET', h, 'url', 'first_at', 'body')
if not r[1] or r[1] == '' then
  redis.call('ZREM', KEYS[1], id)
  redis.call('DEL', h)
  return {id, '', '0', '0', ''}
end
local attempts = redis.call('HINCRBY', h, 'attempts', 1)
return {id, r[1], tostring(attempts), r[2] or '0', r[3] or ''}
"""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could point anywhere (off the allow-list): treat it as a failed attempt."""

    def redirect_request(self, *args, **kwargs):
        return None


class Deliverer:
    """Delivery threads for one worker process (they share the work of every worker via Redis)."""

    def __init__(self, settings, name: str):
        self.metrics = metrics
        self.s = settings
        self.name = name
        self.redis = connect(settings.redis_url)
        self.claim = self.redis.register_script(keys.lua_prelude() + CLAIM)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._secret = secret_bytes(settings) if settings.webhook_allow.strip() else None

    def start(self) -> None:
        if self._secret is None:
            return                      # webhooks off: nothing can be queued
        for i in range(THREADS):
            t = threading.Thread(target=self._run, name=f"webhooks-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.deliver_one():
                    self._stop.wait(0.2)
            except Exception as e:  # noqa: BLE001 - Redis down or a bug: keep the thread alive
                log.warning("webhook delivery loop: %s: %s", type(e).__name__, e)
                self._stop.wait(1.0)

    def deliver_one(self, now: float | None = None) -> bool:
        """Claim one due delivery and attempt it; False when nothing is due."""
        s = self.s
        now = time.time() if now is None else now
        got = self.claim(keys=[keys.WEBHOOKS_DUE],
                         args=[repr(now), repr(now + s.webhook_timeout_s + CLAIM_MARGIN_S)])
        if not got:
            self.metrics.WEBHOOK_PENDING.set(self.redis.zcard(keys.WEBHOOKS_DUE))
            return False
        job_id, url, attempts, first_at, body = (v.decode() if isinstance(v, bytes) else v for v in got)
        if not url:
            return True
        body = body.encode() if body else body_of(self.redis, job_id, s)
        if body is None:
            return self._give_up(job_id, "the job record expired before delivery")
        self.redis.hsetnx(keys.webhook(job_id), "body", body)
        problem = url_problem(url, s.webhook_allow)
        if problem:
            self.metrics.WEBHOOKS.labels(outcome="refused").inc()
            return self._give_up(job_id, problem)
        error = self._post(url, job_id, body)
        if error is None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(keys.WEBHOOKS_DUE, job_id)
            pipe.delete(keys.webhook(job_id))
            pipe.hset(keys.job(job_id), "webhook", "delivered")
            pipe.execute()
            self.metrics.WEBHOOKS.labels(outcome="delivered").inc()
            log.info("webhook for job %s delivered to %s (attempt %s)", job_id, url, attempts)
            return True
        if time.time() - float(first_at or now) > s.webhook_max_age_s:
            return self._give_up(job_id, f"{error} (after {attempts} attempts)")
        delay = min(s.webhook_backoff_s * 2 ** (int(attempts) - 1), s.webhook_backoff_max_s)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.WEBHOOKS_DUE, {job_id: time.time() + delay})
        pipe.hset(keys.webhook(job_id), "last_error", error[:300])
        pipe.execute()
        self.metrics.WEBHOOKS.labels(outcome="retry").inc()
        log.info("webhook for job %s: %s; retry %s in %.1fs", job_id, error, attempts, delay)
        return True

    def _give_up(self, job_id: str, why: str) -> bool:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(keys.WEBHOOKS_DUE, job_id)
        pipe.delete(keys.webhook(job_id))
        pipe.hset(keys.job(job_id), "webhook", f"failed: {why}"[:300])
        pipe.execute()
        self.metrics.WEBHOOKS.labels(outcome="gave_up").inc()
        log.warning("webhook for job %s dropped: %s", job_id, why)
        return True

    def _post(self, url: str, job_id: str, body: bytes) -> str | None:
        """One POST; None on a 2xx answer, else what went wrong."""
        ts = int(time.time())
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "latentd-webhook/1",
            ID_HEADER: job_id, TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(self._secret, ts, body)})
        try:
            with self._opener.open(req, timeout=self.s.webhook_timeout_s) as resp:
                resp.read(65536)
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            return f"{type(e).__name__}: {getattr(e, 'reason', e)}"
