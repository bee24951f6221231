"""API keys: `Authorization: Bearer <key>`. Only SHA-256 hashes of keys are stored (in
LATENTD_API_KEYS as "name:hexhash,..." and/or the keys file, a JSON object {name: hexhash});
a presented key is hashed and compared with every stored hash in constant time
(hmac.compare_digest, no early exit). The key's *name* is the owner id of its jobs; the key itself
is never logged, stored, or put in an error or a metric label.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile

KEY_PREFIX = "ltd_"
ANONYMOUS = "anonymous"        # owner of every job when auth is off


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _check_entry(name: str, digest: str, where: str) -> None:
    if not name or any(c in name for c in ":, \t\n/"):
        raise ValueError(f"{where}: bad key name {name!r} (no ':', ',', '/' or spaces)")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{where}: key {name!r} is not a lowercase hex SHA-256 hash")


def parse_keys(spec: str) -> dict[str, str]:
    """'name:hash,name2:hash2' -> {name: hash}."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, digest = item.partition(":")
        _check_entry(name.strip(), digest.strip(), "LATENTD_API_KEYS")
        out[name.strip()] = digest.strip()
    return out


def keys_path(settings) -> str:
    return os.path.expanduser(settings.keys_file)


def read_keys_file(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{name: sha256hex}}")
    for name, digest in data.items():
        _check_entry(name, str(digest), path)
    return dict(data)


def add_key(path: str, name: str) -> str:
    """Create a key called `name`, store only its hash in the keys file (atomically, mode 0600)
    and return the key (the only time it exists in clear)."""
    keys = read_keys_file(path)
    if name in keys:
        raise ValueError(f"a key named {name!r} already exists in {path}")
    key = new_key()
    keys[name] = hash_key(key)
    _check_entry(name, keys[name], "name")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".keys.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(keys, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return key


def load_keys(settings) -> dict[str, str]:
    keys = read_keys_file(keys_path(settings))
    keys.update(parse_keys(settings.api_keys))
    return keys


def auth_enabled(settings) -> bool:
    return settings.auth.strip().lower() not in ("off", "0", "false", "no")


class KeyStore:
    """name -> SHA-256 digest; `owner(key)` is the name or None."""

    def __init__(self, hashes: dict[str, str]):
        self._items = [(name, bytes.fromhex(h)) for name, h in sorted(hashes.items())]

    def __len__(self) -> int:
        return len(self._items)

    def owner(self, key: str) -> str | None:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, stored in self._items:    # every entry is compared: no early exit
            if hmac.compare_digest(digest, stored):
                found = name
        return found


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
