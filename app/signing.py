"""Signed image URLs: /v1/jobs/{id}/images/{k}?o=<owner>&exp=<unix>&sig=<hmac>, absolute, so an
`<img src>` works without headers. sig = HMAC-SHA256(secret, "v1|{owner}|{id}|{k}|{exp}")
(URL-safe base64, unpadded), compared in constant time. `o` is the key's *name* (the owner id,
never the key), needed to read the job as its owner. Tampering with any of owner, id, k or exp,
moving a signature to another job or image, or an `exp` in the past all fail verification (403).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import quote

from latentd.config import secrets

DEV_SECRET = "latentd-dev-insecure-signing-secret"   # used only when LATENTD_ENV=dev


def _mac(secret: bytes, owner: str, job_id: str, k: int, exp: int) -> str:
    msg = f"v1|{owner}|{job_id}|{k}|{exp}".encode("utf-8", "surrogateescape")
    return base64.urlsafe_b64encode(hmac.new(secret, msg, hashlib.sha256).digest()).rstrip(b"=").decode()


def sign(secret: bytes, owner: str, job_id: str, k: int, ttl_s: int,
         now: float | None = None) -> tuple[int, str]:
    exp = int((time.time() if now is None else now) + ttl_s)
    return exp, _mac(secret, owner, job_id, k, exp)


def signed_path(secret: bytes, owner: str, job_id: str, k: int, ttl_s: int) -> str:
    exp, sig = sign(secret, owner, job_id, k, ttl_s)
    return f"/v1/jobs/{job_id}/images/{k}?o={quote(owner, safe='')}&exp={exp}&sig={sig}"


def verify(secret: bytes, owner: str | None, job_id: str, k: int, exp: str | None,
           sig: str | None, now: float | None = None) -> bool:
    if not owner or not exp or not sig or not exp.isdigit() or len(exp) > 12 or len(sig) > 64:
        return False
    if int(exp) < (time.time() if now is None else now):
        return False
    expected = _mac(secret, owner, job_id, k, int(exp)).encode()
    return hmac.compare_digest(expected, sig.encode("utf-8", "replace"))


def secret_problem(settings) -> str | None:
    """Why the configured signing secret is unacceptable outside dev, or None."""
    s = settings.signing_secret
    if not s:
        return "LATENTD_SIGNING_SECRET is not set (needed to sign image URLs)"
    if secrets.weak(s, DEV_SECRET):
        return f"LATENTD_SIGNING_SECRET is too weak (at least {secrets.MIN_LEN} characters, not the dev default)"
    return None


def secret_bytes(settings) -> bytes:
    return secrets.secret_bytes(settings.signing_secret, settings.env, DEV_SECRET, secret_problem(settings))
