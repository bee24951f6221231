"""Webhooks: when a job that carries a `callback_url` ends, latentd POSTs its record there.

Torch-free (the API uses the allow-list check and the signature helpers).

- Only URLs whose host is on the operator's allow-list are accepted (LATENTD_WEBHOOK_ALLOW:
  comma-separated host names, `*.example.com` suffixes, IP addresses or CIDRs such as
  10.0.0.0/8). A host name is matched by name, never by what it resolves to: list names
  explicitly. Empty list: webhooks are off and any callback_url is refused (422).
- Delivery is state in Redis, not a coroutine: the Lua script that ends a job (end_job in
  jobs/state.py) writes keys.webhook(id) = {url, attempts, first_at} and puts the id in the
  keys.WEBHOOKS_DUE zset in the same transition, so a job that ended is never without its pending
  delivery, whatever process dies next. The workers' delivery threads (worker/webhook_delivery.py)
  POST it, with exponential backoff (webhook_backoff_s, doubling, at most webhook_backoff_max_s)
  until webhook_max_age_s after the job ended. At least once: receivers deduplicate by the
  Latentd-Webhook-Id header.
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
import time
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
