"""API keys: `Authorization: Bearer <key>`. Only SHA-256 hashes of keys are stored (in
LATENTD_API_KEYS as "name:hexhash,..." and/or the keys file, a JSON object {name: hexhash} or,
for a key with settings, {name: {"sha256": hexhash, "permissions": ["moderation_low"],
"max_priority": "normal", "quota": {"images": 1000, "compute_s": 3600, "concurrent": 4}}},
quotas: app/quota.py);
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
# what a key may do beyond the default (keys file only; `latentd keys create --allow-...`):
#   moderation_low  its requests may ask moderation "low" (flagged images come back unredacted)
PERMISSIONS = ("moderation_low",)
# the highest request `priority` a key may send (keys file "max_priority"; `latentd keys create
# --max-priority`). A key without one may use every priority: keys made before priorities
# existed keep working unchanged, and an operator lowers the cap for the keys that must not jump
# the queue.
PRIORITY_ORDER = ("high", "normal", "low")
DEFAULT_MAX_PRIORITY = "high"


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


def _read_file(path: str) -> dict:
    """The keys file as stored: {name: hexhash | {"sha256": hexhash, "permissions": [...]}}."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{name: sha256hex}}")
    for name, entry in data.items():
        _check_entry(name, str(_digest(entry)), path)
        bad = set(_permissions(entry)) - set(PERMISSIONS)
        if bad:
            raise ValueError(f"{path}: key {name!r} has unknown permissions {sorted(bad)} "
                             f"(known: {', '.join(PERMISSIONS)})")
        if _max_priority(entry) not in PRIORITY_ORDER:
            raise ValueError(f"{path}: key {name!r} has max_priority {_max_priority(entry)!r} "
                             f"(known: {', '.join(PRIORITY_ORDER)})")
        _quota(entry, f"{path}: key {name!r} quota")
    return data


def _quota(entry, where: str = "quota") -> dict:
    """A key's quotas (app/quota.py QUOTAS), checked: ValueError naming the bad one."""
    from latentd.app.quota import check_quota

    return check_quota(entry.get("quota", {}), where) if isinstance(entry, dict) else {}


def read_quotas(path: str) -> dict[str, dict]:
    """{name: {images?, compute_s?, concurrent?}} of the keys file, for the keys with a quota."""
    return {name: _quota(e) for name, e in _read_file(path).items() if _quota(e)}


def _digest(entry) -> object:
    return entry.get("sha256") if isinstance(entry, dict) else entry


def _permissions(entry) -> list:
    perms = entry.get("permissions", []) if isinstance(entry, dict) else []
    return perms if isinstance(perms, list) else [perms]


def _max_priority(entry) -> object:
    return entry.get("max_priority", DEFAULT_MAX_PRIORITY) if isinstance(entry, dict) else DEFAULT_MAX_PRIORITY


def read_max_priority(path: str) -> dict[str, str]:
    """{name: its max_priority} of the keys file, for the keys whose cap is below the default."""
    return {name: _max_priority(e) for name, e in _read_file(path).items()
            if _max_priority(e) != DEFAULT_MAX_PRIORITY}


def read_keys_file(path: str) -> dict[str, str]:
    """{name: hexhash} of the keys file ({} when there is none)."""
    return {name: _digest(entry) for name, entry in _read_file(path).items()}


def read_permissions(path: str) -> dict[str, frozenset[str]]:
    """{name: its PERMISSIONS} of the keys file, for the keys that have any."""
    return {name: frozenset(_permissions(e)) for name, e in _read_file(path).items() if _permissions(e)}


def add_key(path: str, name: str, permissions: tuple[str, ...] = (),
            max_priority: str = DEFAULT_MAX_PRIORITY, quota: dict | None = None) -> str:
    """Create a key called `name` (with `permissions`, of PERMISSIONS), store only its hash in
    the keys file (atomically, mode 0600) and return the key (the only time it exists in clear)."""
    keys = _read_file(path)
    if name in keys:
        raise ValueError(f"a key named {name!r} already exists in {path}")
    bad = set(permissions) - set(PERMISSIONS)
    if bad:
        raise ValueError(f"unknown permissions {sorted(bad)} (known: {', '.join(PERMISSIONS)})")
    if max_priority not in PRIORITY_ORDER:
        raise ValueError(f"unknown max priority {max_priority!r} (known: {', '.join(PRIORITY_ORDER)})")
    quota = _quota({"quota": quota or {}}, "quota")   # checked before anything is written
    key = new_key()
    digest = hash_key(key)
    _check_entry(name, digest, "name")
    entry: dict = {"sha256": digest}
    if permissions:
        entry["permissions"] = sorted(permissions)
    if max_priority != DEFAULT_MAX_PRIORITY:
        entry["max_priority"] = max_priority
    if quota:
        entry["quota"] = quota
    keys[name] = entry if len(entry) > 1 else digest
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


def load_permissions(settings) -> dict[str, frozenset[str]]:
    """Per-key permissions: the keys file's (a key named in LATENTD_API_KEYS has none)."""
    env = parse_keys(settings.api_keys)
    return {n: p for n, p in read_permissions(keys_path(settings)).items() if n not in env}


def load_max_priority(settings) -> dict[str, str]:
    """Per-key priority caps: the keys file's (a key named in LATENTD_API_KEYS has the default)."""
    env = parse_keys(settings.api_keys)
    return {n: p for n, p in read_max_priority(keys_path(settings)).items() if n not in env}


def load_quotas(settings) -> dict[str, dict]:
    """Per-key quotas: the keys file's (a key named in LATENTD_API_KEYS has none)."""
    env = parse_keys(settings.api_keys)
    return {n: q for n, q in read_quotas(keys_path(settings)).items() if n not in env}


def auth_enabled(settings) -> bool:
    return settings.auth.strip().lower() not in ("off", "0", "false", "no")


class KeyStore:
    """name -> SHA-256 digest; `owner(key)` is the name or None; `permits(name, what)`."""

    def __init__(self, hashes: dict[str, str], permissions: dict[str, frozenset[str]] | None = None,
                 max_priority: dict[str, str] | None = None, quotas: dict[str, dict] | None = None):
        self._items = [(name, bytes.fromhex(h)) for name, h in sorted(hashes.items())]
        self._permissions = dict(permissions or {})
        self._max_priority = dict(max_priority or {})
        self._quotas = dict(quotas or {})

    def quota(self, name: str) -> dict:
        """The key's quotas ({} : none), app/quota.py."""
        return self._quotas.get(name, {})

    def max_priority(self, name: str) -> str:
        """The highest request priority the key called `name` may send."""
        return self._max_priority.get(name, DEFAULT_MAX_PRIORITY)

    def permits(self, name: str, what: str) -> bool:
        """Whether the key called `name` has the permission `what` (PERMISSIONS)."""
        return what in self._permissions.get(name, ())

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


def basic_password(header: str | None) -> str | None:
    """The password of an `Authorization: Basic base64(user:password)` header, else None: the
    password is the API key, any user name (how AUTOMATIC1111 clients send --api-auth)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    import base64
    import binascii

    try:
        raw = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    _, colon, password = raw.partition(":")
    return password or None if colon else None
