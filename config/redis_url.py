"""LATENTD_REDIS_URL, parsed in one place, and the clients every process builds from it.

Two forms:
  redis://host:port/db, rediss://..., unix:///path   one Redis (redis-py's own URL syntax)
  redis+sentinel://[:password@]h1:26379,h2:26379,h3:26379/<master name>[/<db>]
                                                     Redis Sentinel: the sentinels are asked
                                                     which server is the master, and asked again
                                                     whenever a connection to it fails, so a
                                                     failover needs no restart of any process
  (rediss+sentinel:// is the same with TLS to the master.)

`sync_client(url, **kw)` and `async_client(url, **kw)` give a redis-py client for either form
with the caller's timeouts; `pool_class` lets the API keep its circuit breaker (app/breaker.py)
on a Sentinel-managed pool too. Redis Cluster is not supported (docs/operations.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


class RedisUrlError(ValueError):
    pass


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    password: str | None = None
    username: str | None = None
    ssl: bool = False
    extra: dict = field(default_factory=dict)

    def master_kwargs(self) -> dict:
        kw = {"db": self.db}
        if self.password is not None:
            kw["password"] = self.password
        if self.username:
            kw["username"] = self.username
        if self.ssl:
            kw["ssl"] = True
        return kw


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel(url: str) -> SentinelTarget:
    """`redis+sentinel://[user:password@]h1:p1,h2:p2/<master>[/<db>]` -> SentinelTarget.
    Raises RedisUrlError naming what is wrong (a missing master name, a bad port or db)."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SENTINEL_SCHEMES:
        raise RedisUrlError(f"LATENTD_REDIS_URL: not a sentinel URL: {scheme}://")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        user, sep, pw = auth.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if sep else None)
    hosts = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):                         # [::1]:26379
            host, _, port = part[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        try:
            hosts.append((host, int(port or 26379)))
        except ValueError:
            raise RedisUrlError(f"LATENTD_REDIS_URL: bad sentinel port in {part!r}") from None
    if not hosts:
        raise RedisUrlError("LATENTD_REDIS_URL: a sentinel URL needs at least one host:port")
    segs = [s for s in path.split("?")[0].split("/") if s]
    if not segs:
        raise RedisUrlError("LATENTD_REDIS_URL: a sentinel URL needs the master name: "
                            "redis+sentinel://h1:26379,h2:26379/mymaster/0")
    try:
        db = int(segs[1]) if len(segs) > 1 else 0
    except ValueError:
        raise RedisUrlError(f"LATENTD_REDIS_URL: bad db {segs[1]!r}") from None
    return SentinelTarget(tuple(hosts), unquote(segs[0]), db, password, username,
                          ssl=scheme.lower().startswith("rediss"))


def _sentinel_kwargs(kw: dict) -> dict:
    """Sentinels are asked quickly: a dead one must not hold up asking the next."""
    return {"socket_timeout": min(kw.get("socket_timeout") or 1.0, 1.0),
            "socket_connect_timeout": min(kw.get("socket_connect_timeout") or 1.0, 1.0)}


def sync_client(url: str, pool_class=None, **kw):
    """A redis.Redis for `url` (either form). kw: connection settings (timeouts, max_connections,
    health_check_interval). pool_class: a ConnectionPool subclass (the API's BreakerPool); for a
    sentinel URL a subclass of it and of SentinelConnectionPool is made."""
    import redis

    if not is_sentinel(url):
        if pool_class is None:
            return redis.Redis.from_url(url, **kw)
        return redis.Redis(connection_pool=pool_class.from_url(url, **kw))
    from redis.sentinel import Sentinel, SentinelConnectionPool

    t = parse_sentinel(url)
    sentinel = Sentinel(list(t.sentinels), sentinel_kwargs=_sentinel_kwargs(kw))
    cls = SentinelConnectionPool
    if pool_class is not None:
        cls = type(f"Sentinel{pool_class.__name__}", (pool_class, SentinelConnectionPool), {})
    return sentinel.master_for(t.service, connection_pool_class=cls, **t.master_kwargs(), **kw)


def async_client(url: str, **kw):
    """A redis.asyncio.Redis for `url` (either form)."""
    import redis.asyncio

    if not is_sentinel(url):
        return redis.asyncio.Redis.from_url(url, **kw)
    from redis.asyncio.sentinel import Sentinel

    t = parse_sentinel(url)
    sentinel = Sentinel(list(t.sentinels), sentinel_kwargs=_sentinel_kwargs(kw))
    return sentinel.master_for(t.service, **t.master_kwargs(), **kw)


def first_host(url: str) -> tuple[str, int] | None:
    """A host:port on the route to Redis (for a sentinel URL, the first sentinel's)."""
    if is_sentinel(url):
        return parse_sentinel(url).sentinels[0]
    u = urlsplit(url)
    if u.scheme in ("redis", "rediss") and u.hostname:
        return u.hostname, u.port or 6379
    return None
