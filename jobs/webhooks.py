"""Webhooks: when a job that carries a `callback_url` ends, latentd POSTs its record there.

Torch-free (the API uses the allow-list check and the signature helpers).

- Only URLs whose host is on the operator's allow-list are accepted (LATENTD_WEBHOOK_ALLOW:
  comma-separated host names, `*.example.com` suffixes, IP addresses or CIDRs such as
  10.0.0.0/8). A host name is matched by name, never by what it resolves to: list names
  explicitly. Empty list: webhooks are off and any callback_url is refused (422).
- Delivery is state in Redis, not a coroutine: the Lua script that ends a job (end_job in
  jobs/state.py) writes keys.webhook(id) = {url, attempts, first_at} and puts the id in the
  keys.WEBHOOKS_DUE zset in the same transition, so a job that ended is never without its pending
  delivery, whatever process dies next. Delivery threads in every worker claim due entries
  atomically (the claim pushes the due time past the HTTP timeout: a claimer that dies mid-POST
  is retried after that), POST, and on a non-2xx answer or a connection error reschedule with
  exponential backoff (webhook_backoff_s, doubling, at most webhook_backoff_max_s) until
  webhook_max_age_s after the job ended; then the delivery is dropped and counted as gave_up.
  Delivery is at least once: receivers deduplicate by the Latentd-Webhook-Id header.
- The body is built once (the job record as GET /v1/jobs shows it, without signed URLs) and
  kept with the delivery, so every attempt sends the same bytes. Signature (Standard Webhooks
  style): Latentd-Webhook-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")> with
  Latentd-Webhook-Timestamp: <unix seconds>; verify() rejects old timestamps (replays).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from latentd.config import secrets
from latentd.jobs import keys
from latentd.jobs.state import record_to_dict

log = logging.getLogger("latentd.webhooks")

ID_HEADER = "Latentd-Webhook-Id"
TIMESTAMP_HEADER = "Latentd-Webhook-Timestamp"
SIGNATURE_HEADER = "Latentd-Webhook-Signature"
DEV_SECRET = "latentd-dev-insecure-webhook-secret"    # used only when LATENTD_ENV=dev
TOLERANCE_S = 300                                      # verify(): older timestamps are replays
MAX_URL_CHARS = 2048
THREADS = 2                                            # delivery threads per worker
CLAIM_MARGIN_S = 5     # a claimed delivery is due again this long after its POST's timeout


# --- allow-list ---------------------------------------------------------------------------------
def parse_allow(text: str) -> tuple[set[str], list[str], list]:
    """(exact names, '.suffix' names, IP networks) of LATENTD_WEBHOOK_ALLOW."""
    names, suffixes, nets = set(), [], []
    for item in (x.strip().lower().rstrip(".") for x in (text or "").split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
            continue
        except ValueError:
            pass
        if item.startswith("*."):
            suffixes.append(item[1:])
        else:
            names.add(item)
    return names, suffixes, nets


def url_problem(url: str, allow: str) -> str | None:
    """Why `url` may not be a webhook target under the allow-list `allow`, or None."""
    names, suffixes, nets = parse_allow(allow)
    if not (names or suffixes or nets):
        return "webhooks are off on this server (LATENTD_WEBHOOK_ALLOW is empty)"
    if len(url) > MAX_URL_CHARS:
        return f"longer than {MAX_URL_CHARS} characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a valid URL ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http:// or https:// URL"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials"
    if port == 0:
        return "port 0 is not valid"
    host = parts.hostname.lower().rstrip(".")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if any(ip.version == n.version and ip in n for n in nets) or host in names:
            return None
    elif host in names or any(host.endswith(s) for s in suffixes):
        return None
    return f"host {host!r} is not on this server's webhook allow-list (LATENTD_WEBHOOK_ALLOW)"


# --- signatures ---------------------------------------------------------------------------------
def secret_problem(settings) -> str | None:
    """Why the webhook secret is unacceptable outside dev when webhooks are on, or None."""
    s = settings.webhook_secret
    if not settings.webhook_allow.strip():
        return None
    if secrets.weak(s, DEV_SECRET):
        return (f"LATENTD_WEBHOOK_SECRET must be set (at least {secrets.MIN_LEN} characters) when "
                "LATENTD_WEBHOOK_ALLOW is")
    return None


def secret_bytes(settings) -> bytes:
    return secrets.secret_bytes(settings.webhook_secret, settings.env, DEV_SECRET,
                                secret_problem(settings) or "LATENTD_WEBHOOK_SECRET is not set")


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The Latentd-Webhook-Signature value for a body sent at `timestamp`."""
    mac = hmac.new(secret, str(int(timestamp)).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def verify(secret: bytes, timestamp: str | None, body: bytes, signature: str | None,
           now: float | None = None, tolerance_s: float = TOLERANCE_S) -> bool:
    """What a receiver checks: a fresh timestamp and a matching signature (constant time)."""
    if not timestamp or not signature or not timestamp.isdigit() or len(timestamp) > 12:
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body).encode(), signature.encode())


# --- delivery -----------------------------------------------------------------------------------
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


def body_of(redis, job_id: str, settings) -> bytes | None:
    """The JSON body for a job's webhook, from its record (None: the record has expired)."""
    rec = redis.hgetall(keys.job(job_id))
    if not rec:
        return None
    job = record_to_dict(rec)
    job.pop("queue_position", None)
    status = job.get("status")
    doc = {"type": f"job.{status}", "id": job_id, "job": job}
    if settings.public_url:
        doc["links"] = {"self": f"{settings.public_url.rstrip('/')}/v1/jobs/{job_id}"}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could point anywhere (off the allow-list): treat it as a failed attempt."""

    def redirect_request(self, *args, **kwargs):
        return None


class Deliverer:
    """Delivery threads for one worker process (they share the work of every worker via Redis)."""

    def __init__(self, settings, name: str):
        from latentd.worker import metrics  # here: the API imports this module, not its metrics
        from latentd.worker.recovery import connect

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
