"""The rule latentd's two HMAC secrets follow (image URL signing in app/signing.py, webhook
signatures in jobs/webhooks.py): outside dev, set and strong; in dev, when unset, a fixed public
default so that a laptop runs with no setup (never accepted outside dev)."""
from __future__ import annotations

MIN_LEN = 16


def weak(value: str, dev_default: str) -> bool:
    return len(value) < MIN_LEN or value == dev_default


def secret_bytes(value: str, env: str, dev_default: str, problem: str | None) -> bytes:
    """The secret to use; RuntimeError(problem) when it is unset outside dev."""
    if value:
        return value.encode()
    if env == "dev":
        return dev_default.encode()
    raise RuntimeError(problem or "the secret is not set")
